"""User-facing errors: a short message that names the problem and the fix.

``train.py`` (and every script) catches ``DistillError``, prints its message without a
traceback and exits with status 2.
"""


class DistillError(Exception):
    """A mistake in the user's config, files or data, with the fix in the message."""


class DataError(DistillError):
    """Data that is missing, empty or not in the expected format."""


class ConfigError(DistillError):
    """A config value that cannot work (negative weight, mismatched models, ...)."""


class CheckpointError(DistillError):
    """A checkpoint that is missing, corrupt, or of another architecture."""

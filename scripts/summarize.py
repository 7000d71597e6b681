"""Ablation table and bar plot of a Hydra multirun of train.py.

    python scripts/summarize.py logs/<task_name>/multiruns/<time> [--out PREFIX]

Writes <PREFIX>.md (mean +- std over seeds per variant), <PREFIX>.png and <PREFIX>.json;
PREFIX defaults to DIR/summary.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="the multirun's output folder (holds the numbered job folders)")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default: DIR/summary)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    import matplotlib

    matplotlib.use("Agg")
    from distill.errors import DistillError
    from distill.evaluation.report import summarize_multirun

    try:
        result = summarize_multirun(args.dir, args.out)
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(Path(result["markdown"]).read_text())
    print(f"wrote {result['markdown']}, {result['plot']} and {result['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Split a traced network at a named layer into a body and a head (torch.fx, no module hooks).

``body(x)`` returns the layer's output (torchvision's ``create_feature_extractor``, which traces
train and eval mode separately); ``head(a)`` runs every node after the layer, on ``a`` alone. A
split where the head would need anything else from the body (a skip connection around the layer)
is refused, since Grad-CAM's gradient ``dS/dA`` would then miss that path.
"""

from __future__ import annotations

import re

from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from distill.errors import ConfigError


def _node_names(model: nn.Module, what: str) -> list[str]:
    """The eval-mode graph's node names (torchvision's tracer: ``layer4.1.relu_1``, ``avgpool``, ``fc``)."""
    try:
        return get_graph_node_names(model)[1]
    except Exception as err:  # FX raises many types on untraceable control flow
        raise ConfigError(f"{what} cannot be traced by torch.fx ({type(err).__name__}: {err})") from None


def _layer_name(names: list[str], layer: str, what: str) -> str:
    """The last node inside module ``layer`` (``layer4`` means the output of ``layer4``)."""
    pattern = re.compile(rf"^{re.escape(layer)}(\.|$)")
    matching = [n for n in names if pattern.match(n) is not None]
    if not matching:
        top = ", ".join(dict.fromkeys(n.split(".")[0] for n in names if n != "x"))
        raise ConfigError(f"{what}: layer={layer!r} is not a layer of this network; its layers: {top}")
    return matching[-1]


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _head_graph(graph: fx.Graph, cut: fx.Node, logits: fx.Node, layer: str, what: str) -> fx.Graph:
    """A graph from ``cut`` (its placeholder) to ``logits``; refused if it reads other body nodes."""
    downstream = _descendants(cut)
    from_input = set().union(*(_descendants(n) | {n} for n in graph.nodes if n.op == "placeholder"))
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {cut: head.placeholder("features")}

    def copy(node: fx.Node) -> fx.Node:
        if node not in env:
            if node in from_input and node not in downstream:
                raise ConfigError(
                    f"{what}: layer={layer!r} cannot be explained: the rest of the network also reads "
                    f"'{node.name}' from before it (a skip connection around the layer); name the block "
                    "that contains the skip connection instead, e.g. its parent module"
                )
            env[node] = head.node_copy(node, copy)
        return env[node]

    if logits not in downstream:
        raise ConfigError(f"{what}: the logits do not depend on layer={layer!r}")
    head.output(copy(logits))
    return head


def split_at(model: nn.Module, layer: str, what: str) -> tuple[nn.Module, fx.GraphModule]:
    """``(body, head)`` with ``head(body(x)) == model(x)``; both share ``model``'s parameters."""
    names = _node_names(model, what)
    cut_name = _layer_name(names, layer, what)
    both = create_feature_extractor(model, return_nodes={cut_name: "features", names[-1]: "logits"})
    both.eval()  # the eval graph; dropout modules in the head still follow train()/eval()
    returned = next(n for n in both.graph.nodes if n.op == "output").args[0]
    head = fx.GraphModule(both, _head_graph(both.graph, returned["features"], returned["logits"], layer, what), "Head")
    body = create_feature_extractor(model, return_nodes={cut_name: "features"})
    return body, head


def last_stage(model: nn.Module, pool: str, what: str) -> str:
    """Name of the node that feeds ``pool`` (e.g. ``avgpool``): the default explained layer of a
    torchvision classifier, the last feature stage before the global pool."""
    names = _node_names(model, what)
    for before, name in zip(names, names[1:], strict=False):
        if name == pool or name.startswith(pool + "."):
            return before
    raise ConfigError(f"{what} has no '{pool}' layer: name the explained layer with layer=")

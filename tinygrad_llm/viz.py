"""Seeing backprop: the graph of a loss as Graphviz DOT text, and one backward pass traced.

`to_dot(loss)` draws every node that led to `loss`: an op node names its op and its
output's shape and dtype, a leaf its name (from `names`, such as
dict(model.named_parameters())) or "input"/"constant". Arrows follow the data forward;
backward runs them in reverse. `save_graph` writes the DOT text, or an SVG when
Graphviz's `dot` program is installed. `gradient_trace(loss)` runs loss.backward() and
records, for every node in the order backward reaches it, the norm and largest magnitude
of the gradient arriving there: where gradients vanish, explode or turn NaN shows at a
glance. To check the calculus of a new op, tl.gradcheck comes first (see README).
"""
import importlib
import shutil
import subprocess
from pathlib import Path

from . import backend

# The module, not the function tl.tensor that shadows its name in the package.
_tensor_module = importlib.import_module(".tensor", __package__)


def _nodes(root):
    """Every node behind `root` (parents first), iteratively."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if id(p) not in seen)
    return order


def _label(node, names):
    shape = "x".join(map(str, node.shape)) or "scalar"
    if id(node) in names:
        return f"{names[id(node)]}\\n{shape} {node.dtype}"
    if node._parents or node._backward is not None:
        return f"{node._op}\\n{shape} {node.dtype}"
    return f"{'input' if node.requires_grad else 'constant'}\\n{shape} {node.dtype}"


def to_dot(loss, names=None):
    """The graph behind `loss` as Graphviz DOT text; `names`: {name: Tensor} labels leaves."""
    names = {id(t): name for name, t in (names or {}).items()}
    nodes = _nodes(loss)
    index = {id(n): i for i, n in enumerate(nodes)}
    lines = ["digraph loss {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    for node in nodes:
        leaf = not node._parents
        style = ', style=filled, fillcolor="#dde8f5"' if leaf and node.requires_grad else (
            ', style=filled, fillcolor="#eeeeee"' if leaf else "")
        lines.append(f'  n{index[id(node)]} [label="{_label(node, names)}"{style}];')
    for node in nodes:
        for parent in node._parents:
            lines.append(f"  n{index[id(parent)]} -> n{index[id(node)]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_graph(loss, path, names=None):
    """Write the graph to `path`: DOT text for .dot, an SVG (through Graphviz's `dot`) for .svg."""
    path = Path(path)
    dot = to_dot(loss, names)
    if path.suffix == ".svg":
        program = shutil.which("dot")
        if program is None:
            raise RuntimeError("an SVG needs Graphviz's `dot` program (apt install graphviz); "
                               "save to a .dot file instead and render it elsewhere")
        path.write_bytes(subprocess.run([program, "-Tsvg"], input=dot.encode(), capture_output=True, check=True).stdout)
    else:
        path.write_text(dot)
    return path


def gradient_trace(loss, names=None, retain_graph=False):
    """Run loss.backward() once; return one row per node, in the order backward reached it.

    Each row: {"op", "shape", "norm", "max"}: the op (or the leaf's name) and the L2 norm and
    largest magnitude of the gradient that arrived there. A leaf used twice appears twice.
    """
    names = {id(t): name for name, t in (names or {}).items()}
    rows = []

    def record(node, grad):
        xp = backend.xp_of(grad)
        flat = grad.reshape(-1)
        rows.append({"op": names.get(id(node)) or node._op or ("input" if node.requires_grad else "constant"),
                     "shape": tuple(node.shape), "norm": float(xp.sqrt(xp.vdot(flat, flat).real)),
                     "max": float(xp.abs(flat).max()) if flat.size else 0.0})

    previous, _tensor_module.gradient_hook = _tensor_module.gradient_hook, record
    try:
        loss.backward(retain_graph=retain_graph)
    finally:
        _tensor_module.gradient_hook = previous
    return rows


def format_trace(rows):
    """The trace as a table: step, node, shape, gradient norm and largest magnitude."""
    width = max([len(r["op"]) for r in rows] + [4])
    lines = [f"{'step':>4}  {'node':<{width}}  {'shape':<16}{'grad norm':>12}{'max |grad|':>12}"]
    for step, r in enumerate(rows):
        lines.append(f"{step:>4}  {r['op']:<{width}}  {str(r['shape']):<16}{r['norm']:>12.4g}{r['max']:>12.4g}")
    return "\n".join(lines)

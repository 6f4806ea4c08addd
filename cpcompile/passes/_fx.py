"""Small FX helpers shared by the passes: node matching at the torch level Dynamo emits.

Dynamo records the same operation under several spellings (`torch.matmul` as a function,
`x.transpose(...)` as a method, `F.linear` as `torch._C._nn.linear`); `is_op` hides that.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx

# One name per operation, every spelling Dynamo uses for it.
_FUNCTIONS: dict[str, tuple[Callable, ...]] = {
    "linear": (torch._C._nn.linear, F.linear),
    "sdpa": (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention),
    "matmul": (torch.matmul, operator.matmul, torch.bmm),
    "softmax": (F.softmax, torch.softmax, torch.Tensor.softmax),
    "dropout": (F.dropout, torch.dropout),
    "tanh": (torch.tanh, torch.Tensor.tanh),
    "mul": (operator.mul, torch.mul),
    "truediv": (operator.truediv, torch.div),
    "add": (operator.add, torch.add),
    "getitem": (operator.getitem,),
}
_METHODS: dict[str, tuple[str, ...]] = {
    "matmul": ("matmul", "__matmul__"),
    "softmax": ("softmax",),
    "tanh": ("tanh",),
    "mul": ("mul", "__mul__"),
    "truediv": ("div", "__truediv__"),
    "add": ("add", "__add__"),
    "to": ("to", "type", "float", "half", "bfloat16"),
    "transpose": ("transpose",),
    "expand": ("expand",),
    "reshape": ("reshape", "view"),
    "contiguous": ("contiguous",),
}


def is_op(node: Any, name: str) -> bool:
    """True if `node` is a call of the operation `name` in any of its spellings."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        if name == "kv_cache_read":
            return node.target is torch.ops.cpcompile.kv_cache_read.default or node.target is torch.ops.cpcompile.kv_cache_read
        if name in ("transpose", "reshape", "expand", "contiguous", "to") and node.target in _TORCH_FN.get(name, ()):
            return True
        return node.target in _FUNCTIONS.get(name, ())
    if node.op == "call_method":
        return node.target in _METHODS.get(name, ())
    return False


_TORCH_FN = {
    "transpose": (torch.transpose,),
    "reshape": (torch.reshape,),
}


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The argument at positional `index` or keyword `name` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    """The example value (a FakeTensor) Dynamo recorded for a node, or the constant itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def shape(node: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in val(node).shape)


def users_of(node: fx.Node, name: str) -> list[fx.Node]:
    return [u for u in node.users if is_op(u, name)]


def single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def getitem_user(node: fx.Node, index: int) -> fx.Node | None:
    for u in node.users:
        if is_op(u, "getitem") and u.args[1] == index:
            return u
    return None


def _reach(start: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]], stop: Callable[[fx.Node], bool]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(start)
    while todo:
        for m in step(todo.pop()):
            if m not in seen:
                seen.add(m)
                if not stop(m):
                    todo.append(m)
    return seen


def ancestors(node: fx.Node, stop: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """All nodes `node` depends on, not walking past nodes for which `stop` is true (they are included)."""
    return _reach([node], lambda n: n.all_input_nodes, stop)


def descendants(nodes: Iterable[fx.Node], stop: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """All nodes that depend on `nodes`, not walking past nodes for which `stop` is true (they are included)."""
    return _reach(nodes, lambda n: n.users, stop)


def strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """Undo HF's `repeat_kv`: `x[:, :, None].expand(B, H, n, S, D).reshape(B, H*n, S, D)` -> (x, n).

    Returns `(node, 1)` when `node` is not a repeat_kv.
    """
    if is_op(node, "reshape"):
        exp = node.args[0]
        if is_op(exp, "expand") and is_op(exp.args[0], "getitem"):
            src, index = exp.args[0].args
            if (
                isinstance(index, tuple)
                and len(index) == 5
                and index[2] is None
                and all(i == slice(None) for i in (index[0], index[1], index[3], index[4]))
            ):
                n_rep = shape(exp)[2]
                return src, n_rep
    return node, 1


def insert_call(graph: fx.Graph, target: Callable, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Insert a call_function node and fill its meta['val'] by running `target` on the args' fake values."""
    node = graph.call_function(target, args, kwargs or {})
    fake_args = fx.node.map_arg(args, val)
    fake_kwargs = fx.node.map_arg(kwargs or {}, val)
    fakes = [v for v in torch.utils._pytree.tree_leaves((fake_args, fake_kwargs)) if hasattr(v, "fake_mode")]
    if not fakes:  # e.g. torch.arange: take the graph's fake mode from any node
        fakes = [v for n in graph.nodes if hasattr(v := val(n), "fake_mode")][:1]
    if fakes:
        with fakes[0].fake_mode:
            out = target(*fake_args, **fake_kwargs)
        node.meta["val"] = node.meta["example_value"] = out
    return node


def erase_unused(g: fx.Graph, node: fx.Node) -> None:
    """Erase `node` if nothing uses it, then whatever computed only its inputs (never graph inputs,
    constants or the output)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n.users or n.op != "call_function":
            continue
        inputs = n.all_input_nodes
        g.erase_node(n)
        todo += inputs


def op_count(gm: fx.GraphModule, name: str) -> int:
    """How many nodes of operation `name` the graph holds (tests assert these before/after each pass)."""
    return sum(is_op(n, name) for n in gm.graph.nodes)


def last_frame(text: str) -> str | None:
    """'modeling_gpt_oss.py:120 in eager_attention_forward: `...`': the innermost 'File "...", line N,
    in f' frame of a traceback-style text (an FX node's stack_trace, Dynamo's "from user code")."""
    lines = text.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith('File "'):
            parts = line.split('"')
            path = parts[1].rsplit("/", 1)[-1] if len(parts) > 2 else "?"
            rest = parts[-1].replace(", line ", ":").replace(", in ", " in ").strip()
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{path}{rest}" + (f": `{code}`" if code else "")
    return None


def source_line(n: fx.Node) -> str:
    """The model's source line that made `n` (see `last_frame`)."""
    return last_frame(n.meta.get("stack_trace") or "") or "source unknown"

"""The token-wise classifier of split_tokens: which ops may run on a token-split value.

Token-wise ops (what may run on a CHUNK / GATHERED value): pointwise ops (by ATen's `pointwise`
tag), reductions / norms / softmax / chunk / pad / index_select over feature dims only,
`linear`, casts and eval-mode dropout. Operands that do not vary over tokens (weights,
scalars) broadcast as before; a FULL token-shaped operand is sliced to the chunk (sp). Anything
else takes the safe path under sp (all-gather first) and is an error under world_tp: the pass
never leaves a mixed layout, so it cannot be silently wrong.

Everything here reads the node alone (plus what the caller passes in): no walker state.
"""

from __future__ import annotations

import torch
from torch import fx

from cpcompile.passes._fx import is_op, shape, val
from cpcompile.passes.plan import ATTENTION_INPUT_ROLES

_c10d = torch.ops._c10d_functional

# ops that act on each token on its own when their dims are feature dims (checked per node)
IDENTITY_LIKE = {"to", "type", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach", "dropout"}
REDUCE_DIM1 = {"mean", "sum", "amax", "amin", "var", "std", "softmax", "log_softmax", "logsumexp", "argmax", "argmin",
               "index_select", "narrow"}
REDUCE_DIM2 = {"chunk", "split", "topk", "norm"}
NORMS = {"layer_norm", "rms_norm"}
NAME_ALIASES = {"truediv": "div", "floordiv": "floor_divide", "and_": "bitwise_and", "or_": "bitwise_or", "invert": "bitwise_not"}


def op_name(node: fx.Node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    name = name.strip("_")
    return NAME_ALIASES.get(name, name)


def aten_pointwise(name: str) -> bool:
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        return False
    try:
        return any(torch.Tag.pointwise in getattr(op, o).tags for o in op.overloads())
    except (AttributeError, RuntimeError):
        return False


def feature_dims(dims, ndim: int) -> bool:
    """True when every dim in `dims` is a feature dim (not 0 or 1, the token dims)."""
    if dims is None:
        return False
    dims = dims if isinstance(dims, (list, tuple)) else (dims,)
    return all(isinstance(d, int) and (d if d >= 0 else d + ndim) >= 2 for d in dims)


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` (counting the tensor as 0, for functions and methods alike) or keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_tokenwise(n: fx.Node, split: fx.Node, role: str | None, chunk: bool, tp_group: str | None) -> bool:
    """Whether `n` may run on its token-split input `split` as it is.
    `role`: `n`'s projection role when it is a linear; `chunk`: the split layout is CHUNK (sp), whose
    tp group (`tp_group`) shares this chunk, so an all-reduce over it keeps the tokens split."""
    if n.op not in ("call_function", "call_method"):
        return False
    name = op_name(n)
    if is_op(n, "linear"):
        return role not in ATTENTION_INPUT_ROLES + ("lm_head",)
    if name == "getitem":
        src = n.args[0]
        if isinstance(val(src), (tuple, list)):  # chunk/split outputs
            return isinstance(n.args[1], int)
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if idx and idx[0] is Ellipsis:
            return all(isinstance(i, (slice, int)) for i in idx[1:]) and len(idx) - 1 <= len(shape(src)) - 2
        return len(idx) >= 2 and idx[0] == slice(None) and idx[1] == slice(None) and None not in idx[2:]
    ndim = len(shape(split))
    if n.target is _c10d.all_reduce.default:  # FFN down over tp (sp): the tp group shares this chunk
        return chunk and n.args[2] == tp_group
    if n.target is _c10d.wait_tensor.default:
        return True
    if name in IDENTITY_LIKE:
        return name != "dropout" or not arg(n, 2, "training", True) or arg(n, 1, "p", 0.5) == 0
    if name in REDUCE_DIM1:
        return feature_dims(arg(n, 1, "dim"), ndim)
    if name in REDUCE_DIM2:
        default = -1 if name == "topk" else (0 if name in ("chunk", "split") else None)
        return feature_dims(arg(n, 2, "dim", default), ndim)
    if name in NORMS:
        ns = arg(n, 1, "normalized_shape")
        return isinstance(ns, (list, tuple)) and len(ns) <= ndim - 2
    if name == "pad":
        pad = arg(n, 1, "pad")
        return isinstance(pad, (list, tuple)) and len(pad) <= 2 * (ndim - 2)
    return aten_pointwise(name)


def output_ndim(n: fx.Node) -> int | None:
    """The rank of `n`'s output, None when it returns several (chunk / split)."""
    return len(shape(n)) if not isinstance(val(n), (tuple, list)) else None


def token_shaped(i: fx.Node, out_ndim: int | None) -> tuple | None:
    """A tensor operand `i` of a pointwise op whose output has rank `out_ndim`: its shape padded to
    that rank when it varies over the tokens, None when it broadcasts over them."""
    if not isinstance(val(i), torch.Tensor):
        return None
    s = shape(i)
    nd = out_ndim if out_ndim is not None else len(s)
    padded = (1,) * (nd - len(s)) + s
    if nd < 2 or len(s) > nd or padded[:2] == (1, 1):
        return None  # broadcasts over the tokens: a weight, a scalar, a per-feature constant
    return padded

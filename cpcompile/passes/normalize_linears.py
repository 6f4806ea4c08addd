"""Pass 0 — every projection form becomes one `linear`, so that the role finder sees them all.

A projection is a product of an activation with a model weight (a 2D parameter or buffer).
Models write it in many ways, and Dynamo records each literally:

  * `F.linear(x, W, b)` (nn.Linear): left as is;
  * `x @ W.T`, `torch.matmul(x, W.t())`, `torch.mm(x2d, W.transpose(0, 1))` (a Linear subclass
    overriding `forward`): W stored `[out, in]`;
  * `torch.addmm(b, x2d, W)`, `x @ W + b` (GPT-2's `Conv1D`): W stored `[in, out]`;
  * `torch.bmm` / `torch.baddbmm(b, x, W.expand(B, in, out))`: the same, batched;
  * any of these behind dtype casts (`W.to(x.dtype)`), `.contiguous()` and the batch `expand`.

Each is rewritten into `torch._C._nn.linear(x, W', b)`, where `W'` is the weight in `[out, in]`
orientation (`W.t()` inserted where the weight is stored `[in, out]`; casts kept). A bias added
right after (`x @ W + b`, `addmm`'s first argument) is folded when it is a 1D weight of the output
width; any other addend stays an `add`. The rewrite computes the same products from the same
memory layout; a folded bias is added inside the product (as `nn.Linear` does), which may round
differently from a separate add in the last bit.

The weight's orientation is read back by `weight_source` (the parameter node and whether it is
stored transposed), which `find_projections` records and `shard_weights` slices by: a column
shard of a `[in, out]` weight is a set of its columns.

Not rewritten (and listed by `unrecognised_products` for `explain`'s "not understood"): a weight on
the left (`W @ x`), `einsum`, scaled `addmm` (alpha/beta != 1), a weight reached through any other
op. A layer whose attention then lacks a projection role is refused by the role checks
(`find_projections.check_roles`), never guessed.

Before:  t = l_w_.t(); y = torch.matmul(x, t)               (W: [out, in])
After:   y = torch._C._nn.linear(x, l_w_, None)
Before:  v = x.view(-1, 64); y = torch.addmm(l_b_, v, l_w_)   (W: [in, out], Conv1D)
After:   w = l_w_.t(); y = torch._C._nn.linear(v, w, l_b_)
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from cpcompile.passes._fx import is_op, val

_MATMULS = (operator.matmul, torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm)
_MATMUL_METHODS = ("matmul", "__matmul__", "mm", "bmm")
_ADDMMS = (torch.addmm, torch.baddbmm, torch.Tensor.addmm, torch.Tensor.baddbmm)
_ADDMM_METHODS = ("addmm", "baddbmm")
_CASTS = ("to", "type", "float", "half", "bfloat16", "double", "contiguous")


def is_transpose(n: fx.Node) -> bool:
    """A 2D transpose of its first argument: `.T`, `.mT`, `.t()`, `transpose(0, 1)`, `permute(1, 0)`."""
    if n.op == "call_function" and n.target is getattr and n.args[1] in ("T", "mT"):
        return True
    if n.op == "call_function" and n.target is torch.t or n.op == "call_method" and n.target == "t":
        return True
    dims = tuple(n.args[1:]) if len(n.args) > 2 else tuple(n.args[1]) if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else ()
    if n.op == "call_method" and n.target in ("transpose", "permute") or n.op == "call_function" and n.target in (torch.transpose, torch.permute):
        v = val(n.args[0])
        return isinstance(v, torch.Tensor) and v.dim() == 2 and sorted(d % 2 for d in dims) == [0, 1]
    return False


def is_cast(n: fx.Node) -> bool:
    if n.op == "call_method" and n.target in _CASTS:
        return all(not isinstance(a, fx.Node) for a in list(n.args[1:]) + list(n.kwargs.values()))
    return False


def is_batch_view(n: fx.Node) -> bool:
    """`W.expand(B, in, out)` / `W.unsqueeze(0)` / `W[None]` that bmm/baddbmm/matmul broadcast over."""
    if n.op == "call_method" and n.target in ("expand", "unsqueeze") or is_op(n, "getitem"):
        src = n.args[0]
        if not (isinstance(src, fx.Node) and isinstance(val(src), torch.Tensor) and isinstance(val(n), torch.Tensor)):
            return False
        s, d = tuple(val(src).shape), tuple(val(n).shape)
        return len(s) in (2, 3) and len(d) == 3 and d[1:] == s[-2:] and all(k == 1 for k in s[:-2])
    return False


def weight_source(node, weights: set[fx.Node]) -> tuple[fx.Node, bool] | None:
    """(the weight node `node` is a view of, whether `node` is that weight transposed), looking
    through casts, transposes and batch views; None when `node` is not a view of a weight."""
    flips = 0
    while isinstance(node, fx.Node) and node not in weights:
        if is_transpose(node):
            flips += 1
        elif not (is_cast(node) or is_batch_view(node)):
            return None
        node = node.args[0]
    return (node, bool(flips % 2)) if isinstance(node, fx.Node) else None


def weight_nodes(gm: fx.GraphModule, names: dict[fx.Node, str] | None, dim: int = 2) -> set[fx.Node]:
    """The graph inputs that are `dim`-D model weights: by identity when `names` is given, else (a
    bare function traced in tests) the placeholders Dynamo typed as parameters, and `get_attr`s."""
    out = set()
    for n in gm.graph.nodes:
        v = val(n)
        if n.op not in ("placeholder", "get_attr") or not isinstance(v, torch.Tensor) or v.dim() != dim:
            continue
        if n.op == "get_attr" or (n in names if names is not None else n.type is torch.nn.Parameter):
            out.add(n)
    return out


def _operands(n: fx.Node) -> tuple[object, object, object] | None:
    """(bias or None, activation, weight operand) of a matmul/addmm-like call, else None."""
    if n.op == "call_function" and n.target in _MATMULS or n.op == "call_method" and n.target in _MATMUL_METHODS:
        if len(n.args) == 2 and not n.kwargs:
            return None, n.args[0], n.args[1]
    if n.op == "call_function" and n.target in _ADDMMS or n.op == "call_method" and n.target in _ADDMM_METHODS:
        if len(n.args) == 3 and all(n.kwargs.get(k, 1) == 1 for k in ("alpha", "beta")) and set(n.kwargs) <= {"alpha", "beta"}:
            return n.args[0], n.args[1], n.args[2]
    return None


def _call(g: fx.Graph, kind: str, target, args: tuple) -> fx.Node:
    node = g.call_method(target, args) if kind == "method" else g.call_function(target, args)
    fake = [val(a) if isinstance(a, fx.Node) else a for a in args]
    anchor = next((v for v in fake if hasattr(v, "fake_mode")), None)
    if anchor is not None:
        with anchor.fake_mode:
            out = getattr(fake[0], target)(*fake[1:]) if kind == "method" else target(*fake)
        node.meta["val"] = node.meta["example_value"] = out
    return node


def _foldable_bias(b, biases: set[fx.Node], out_features: int) -> bool:
    """`b` is a 1D model weight of the output width (casts looked through)."""
    v = val(b) if isinstance(b, fx.Node) else None
    if v is None or v.dim() != 1 or v.shape[0] != out_features:
        return False
    while isinstance(b, fx.Node) and is_cast(b):
        b = b.args[0]
    return b in biases


def normalize_linears(gm: fx.GraphModule, names: dict[fx.Node, str] | None = None) -> int:
    """Rewrite every matmul-form projection into `linear` (module docstring); returns how many."""
    g = gm.graph
    weights, biases = weight_nodes(gm, names), weight_nodes(gm, names, dim=1)
    done = 0
    for n in list(g.nodes):
        ops = _operands(n)
        if ops is None:
            continue
        bias, x, w = ops
        src = weight_source(w, weights)
        if src is None or not isinstance(x, fx.Node) or val(x) is None or val(x).dim() < 1:
            continue
        out_features = int(val(w).shape[-1])
        with g.inserting_before(n):
            lin_w = w  # the operand is [in, out]; linear takes [out, in]
            while is_batch_view(lin_w):  # linear broadcasts over leading dims by itself
                lin_w = lin_w.args[0]
            lin_w = lin_w.args[0] if is_transpose(lin_w) else _call(g, "method", "t", (lin_w,))
            folded = bias is not None and _foldable_bias(bias, biases, out_features)
            lin = _call(g, "function", torch._C._nn.linear, (x, lin_w, bias if folded else None))
            lin.meta["cpcompile_normalized"] = n.format_node()
            y = lin
            if bias is not None and not folded:
                y = _call(g, "function", operator.add, (bias, lin))
        n.replace_all_uses_with(y)
        g.erase_node(n)
        _erase_unused_views(g, w)
        done += 1
        _fold_following_bias(g, lin, biases)
    if done:  # (no eliminate_dead_code: it would drop the cache writes, in-place methods FX thinks pure)
        g.lint()
        gm.recompile()
    return done


def _erase_unused_views(g: fx.Graph, node) -> None:
    """Erase the weight views (transposes, casts, batch views) the rewrite left without users."""
    while isinstance(node, fx.Node) and not node.users and (is_transpose(node) or is_cast(node) or is_batch_view(node)):
        src = node.args[0]
        g.erase_node(node)
        node = src


def _fold_following_bias(g: fx.Graph, lin: fx.Node, biases: set[fx.Node]) -> None:
    """`linear(x, W) + b` with `b` a 1D weight of the output width -> `linear(x, W, b)`."""
    if len(lin.args) > 2 and lin.args[2] is not None or len(lin.users) != 1:
        return
    add = next(iter(lin.users))
    if not (is_op(add, "add") and len(add.args) == 2 and not add.kwargs):
        return
    b = add.args[1] if add.args[0] is lin else add.args[0]
    if not _foldable_bias(b, biases, int(val(lin).shape[-1])):
        return
    if val(add).shape != val(lin).shape or val(add).dtype != val(lin).dtype:
        return
    # `b` must be defined before `lin` to move into it: it is a weight (or a cast of one); place the new linear at the add
    with g.inserting_before(add):
        new = _call(g, "function", torch._C._nn.linear, (lin.args[0], lin.args[1], b))
    new.meta.update({k: v for k, v in lin.meta.items() if k.startswith("cpcompile")})
    add.replace_all_uses_with(new)
    g.erase_node(add)
    g.erase_node(lin)


def unrecognised_products(gm: fx.GraphModule, names: dict[fx.Node, str] | None = None) -> list[str]:
    """Products of an activation with a model weight that did not become a `linear` (for `explain`)."""
    weights = weight_nodes(gm, names)
    out = []
    for n in gm.graph.nodes:
        if is_op(n, "linear") or n.op not in ("call_function", "call_method"):
            continue
        if weight_source(n, weights) is not None:
            continue  # a view of a weight, not a product
        for a in n.all_input_nodes:
            src = weight_source(a, weights)
            if src is not None and (_operands(n) is not None or n.target in (torch.einsum, torch.nn.functional.bilinear)):
                label = names.get(src[0], src[0].name) if names else src[0].name
                out.append(f"{n.format_node()} uses weight {label} in a product cpcompile does not read as a projection")
                break
    return out

"""Pass 5c — MoE experts over the MoE group: tensor-parallel (moe='tp') or expert-parallel (moe='ep').

Cases handled (the `expert_up` / `expert_down` grouped matmuls find_projections found, with the
shards `shard_weights.expert_shards` decided; `grouped_mm(x [S, in], W [E, in, out], offs)` runs row
group g of x, the rows routed to expert g after HF sorted them by expert, through W[g]):
  * moe='tp' ("expert-column" / "expert-row"): as a dense FFN. expert_up runs on this rank's
    columns of every expert and is placed back at their positions of the full width (zeros
    elsewhere, as shard_linears does, marked for local_layouts to keep local); expert_down reads
    its input chunk and makes a partial sum.
    Every token visits its experts on every rank.
  * moe='ep' ("expert"): this rank holds experts [e0, e1) whole. Each grouped matmul runs only on
    the rows routed to them: x's rows are rotated so that the first local row comes first
    (`start = offs[e0-1]`), the local offsets are `offs[e0:e1] - start`, and the result is rotated
    back with the rows of other experts set to zero (`where`, so rows a kernel left unwritten can
    never leak). The routing weights of other experts thus meet zeros: nothing is dropped, the
    shapes stay static.
  * either way the partial sum is not reduced at once: the all-reduce is sunk through the ops that
    are linear in it (the routing-weight product, the un-permute, the sum over top-k, views, casts
    that do not narrow), so there is one all-reduce per MoE layer of [tokens, H], after the routed
    combine, instead of one of [tokens * top_k, H]. A shared expert's partial sum added there (its
    down row-parallel over the same group, times its gate) joins it: its own all-reduce is removed.

Before (moe='ep', 2 ranks, E = 4, rank 1):
    y = grouped_mm(x, W_up.transpose(-2, -1), offs=offs); ...; z = grouped_mm(h, W_down.transpose(-2, -1), offs=offs)
    out = (z * w[:, None])[inv].view(T, k, H).sum(1)
After:
    start = offs[1]; end = offs[3]; rot = (arange(S) + start) % S; back = (arange(S) - start) % S
    keep = (arange(S) >= start) & (arange(S) < end)
    y = where(keep[:, None], grouped_mm(x[rot], W_up_loc.transpose(-2, -1), offs=offs[2:4] - start)[back], 0)
    ... the same for z ...;  out = wait_tensor(all_reduce((z * w[:, None])[inv].view(T, k, H).sum(1), 'sum', replica))
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from cpcompile.passes._fx import erase_unused, insert_call, is_op, shape, val
from cpcompile.passes.find_projections import grouped_mm_args, is_grouped_mm
from cpcompile.passes.local_layouts import mark_local
from cpcompile.passes.shard_linears import all_reduce, graph_constant, place_columns
from cpcompile.passes.shard_weights import RankWeights

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext

# ops through which an all-reduce may be moved: linear in the partial sum (the other operands
# do not depend on it), so sum_r f(p_r) == f(sum_r p_r)
_LINEAR_METHODS = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "permute", "transpose", "contiguous", "clone", "sum"}
_LINEAR_FUNCTIONS = (operator.getitem, torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze, torch.sum)
_CASTS = {"to", "type", "float", "double"}


def shard_experts(
    gm: fx.GraphModule,
    weights: "RankWeights",
    ctx: "RankContext",
    roles: dict[str, str],
) -> dict[str, int]:
    """`roles`: parameter name -> role (expert_up / expert_down). Returns counts: expert grouped matmuls rewritten (tp / ep) and all-reduces inserted."""
    shards, local = weights.shards, weights.local
    g = gm.graph
    counts = {"expert_tp": 0, "expert_ep": 0, "all_reduce": 0, "merged": 0}
    done = set()
    rotations: dict[tuple, tuple] = {}
    for n in list(g.nodes):
        name = n.meta.get("cpcompile_weight")
        if not is_grouped_mm(n) or name not in shards:
            continue
        shard, (w_loc, _) = shards[name], local[name]
        done.add(name)
        x, w, offs = grouped_mm_args(n)
        with g.inserting_before(n):
            w_node = graph_constant(gm, w_loc.to(val(w).dtype), "_cpcompile_w")
            if not shard.transposed:  # stored [E, out, in]: the matmul reads it transposed, as HF's code does
                w_node = insert_call(g, torch.transpose, (w_node, -2, -1))
            if shard.kind == "expert":
                key = (offs, int(shard.cols[0]), int(shard.cols[-1]) + 1)
                if key not in rotations:
                    rotations[key] = _rotation(g, offs, key[1], key[2], shape(x)[0])
                y = _local_experts(g, n, x, w_node, rotations[key])
                counts["expert_ep"] += 1
            elif shard.kind == "expert-column":
                y_loc = _grouped(g, n, x, w_node, offs)
                y = place_columns(gm, y_loc, shard, shape(n)[-1])
                mark_local(y, y_loc, -1, shard.cols.tolist(), shape(n)[-1], shard.group, ctx.name(shard.group),
                           ctx.size(shard.group))  # kept local by local_layouts
                counts["expert_tp"] += 1
            else:
                c = shard.cols
                x_loc = insert_call(g, operator.getitem, (x, (Ellipsis, slice(int(c[0]), int(c[-1]) + 1))))
                y = _grouped(g, n, x_loc, w_node, offs)
                counts["expert_tp"] += 1
        n.replace_all_uses_with(y)
        g.erase_node(n)
        if roles.get(name) == "expert_down":
            counts["merged"] += _sink_all_reduce(g, y, ctx.name(shard.group))
            counts["all_reduce"] += 1
    missing = sorted(k for k, s in shards.items() if s.kind.startswith("expert") and k not in done)
    if missing:
        raise ValueError(f"cpcompile: the plan shards the experts {missing[:4]}, but this graph runs them through no grouped "
                         "matmul it recognised; please report this model.")
    g.lint()
    gm.recompile()
    return counts


def _grouped(g: fx.Graph, n: fx.Node, x, w, offs) -> fx.Node:
    kwargs = dict(n.kwargs)
    args = list(n.args)
    args[0], args[1] = x, w
    if "offs" in kwargs:
        kwargs["offs"] = offs
    elif len(args) > 2:
        args[2] = offs
    return insert_call(g, n.target, tuple(args), kwargs)


def _rotation(g: fx.Graph, offs: fx.Node, e0: int, e1: int, rows: int) -> tuple:
    """(rot, back, keep, local offsets) for experts [e0, e1): see the module docstring."""
    start = insert_call(g, operator.getitem, (offs, e0 - 1)) if e0 > 0 else 0
    end = insert_call(g, operator.getitem, (offs, e1 - 1))
    ar = insert_call(g, torch.arange, (rows,), {"device": val(offs).device})
    rot = insert_call(g, operator.mod, (insert_call(g, operator.add, (ar, start)), rows))
    back = insert_call(g, operator.mod, (insert_call(g, operator.sub, (ar, start)), rows))
    keep = insert_call(g, operator.and_, (insert_call(g, operator.ge, (ar, start)), insert_call(g, operator.lt, (ar, end))))
    local_offs = insert_call(g, operator.getitem, (offs, slice(e0, e1)))
    if e0 > 0:
        local_offs = insert_call(g, operator.sub, (local_offs, start))
    return rot, back, insert_call(g, torch.unsqueeze, (keep, -1)), local_offs


def _local_experts(g: fx.Graph, n: fx.Node, x, w, rotation) -> fx.Node:
    rot, back, keep, local_offs = rotation
    x_rot = insert_call(g, torch.Tensor.index_select, (x, 0, rot))
    y_rot = _grouped(g, n, x_rot, w, local_offs)
    y = insert_call(g, torch.Tensor.index_select, (y_rot, 0, back))
    return insert_call(g, torch.where, (keep, y, 0.0))


def _linear_in(u: fx.Node, x: fx.Node) -> bool:
    """`u` is linear in its input `x` (and its other operands do not depend on x)."""
    if is_op(u, "mul"):
        return sum(a is x for a in u.args[:2]) == 1
    if is_op(u, "truediv"):
        return u.args[0] is x and u.args[1] is not x
    if u.op == "call_method" and u.target in _CASTS:
        dt = val(u).dtype
        return dt.is_floating_point and torch.finfo(dt).bits >= torch.finfo(val(x).dtype).bits
    if u.op == "call_method":
        return u.target in _LINEAR_METHODS and u.args[0] is x
    return u.op == "call_function" and u.target in _LINEAR_FUNCTIONS and u.args[0] is x


def _sink_all_reduce(g: fx.Graph, partial: fx.Node, group: str) -> int:
    """Reduce `partial` once, as late as the ops linear in it allow. Where the chain meets an add
    with another partial sum over the same group (a shared expert's down, all-reduced by
    shard_linears, times its sigmoid gate), that all-reduce is removed and the sum of the two
    partials is reduced instead: one all-reduce per MoE block. Returns the all-reduces removed."""
    end, merged = _chain_end(partial), 0
    while len(end.users) == 1 and is_op(add := next(iter(end.users)), "add") and len(add.args) == 2:
        other = add.args[1] if add.args[0] is end else add.args[0]
        row = _reduced_partial(other, group) if isinstance(other, fx.Node) else None
        if row is None:
            break
        reduced, shared_partial = row
        reduced.replace_all_uses_with(shared_partial)  # the shared expert's sum now rides on this one
        erase_unused(g, reduced)
        merged += 1
        end = _chain_end(add)
    users = list(end.users)
    with g.inserting_before(end.next):
        y = all_reduce(g, end, group)
    for u in users:
        u.replace_input_with(end, y)
    return merged


def _chain_end(x: fx.Node) -> fx.Node:
    while len(x.users) == 1 and _linear_in(next(iter(x.users)), x):
        x = next(iter(x.users))
    return x


def _reduced_partial(x: fx.Node, group: str) -> tuple[fx.Node, fx.Node] | None:
    """(all-reduced output, its partial) when `x` is a bias-free row all-reduce over `group`
    (shard_linears' `meta["cpcompile_row"]`) followed only by ops linear in it, each its sole use."""
    row = x.meta.get("cpcompile_row")
    if row is not None:
        return (x, row["partial"]) if row["bias"] is None and row.get("group_name") == group else None
    for i in x.all_input_nodes:  # mul(gate, y): try each operand the op is linear in
        if len(i.users) == 1 and _linear_in(x, i) and (found := _reduced_partial(i, group)) is not None:
            return found
    return None

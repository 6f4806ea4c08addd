"""Pass 5 — execute the weight shards on the graph: local linears plus explicit all-reduces.

Cases handled (a `WeightShard` per sharded parameter, from `shard_weights.py`):
  * column: `y = linear(x, W, b)` -> `y_loc = linear(x, W_loc, b_loc)` placed back at this
    rank's columns of the full width, zeros elsewhere (`F.pad` when they are one block, else
    `F.pad` by one zero column and an `index_select` that scatters them). Everything downstream
    keeps the single-device feature widths Dynamo traced (head counts, Phi-3's fixed qkv
    offsets, chunked gate_up), so no shape constant needs rewriting; other ranks' columns are
    zeros that only this rank's attention heads or FFN chunk ever read. Only the last dim is
    touched, so the token dims may change later (split_tokens.py).
  * row: `y = linear(x, W, b)` -> `all_reduce(linear(x[..., cols], W_loc), group) + b`, the
    all-reduce an explicit `_c10d_functional.all_reduce` + `wait_tensor` pair.

Each local linear carries `meta["cpcompile_weight"]` (the parameter it stands for) and each row
output `meta["cpcompile_row"]` (its partial sum, bias and group), so that `split_tokens` can turn
an all-reduce into the reduce-scatter its token layout needs.

The model's own parameters for these weights are zero-storage stand-ins of the full shape
(so Dynamo traces single-device shapes); the local shards enter the graph as `get_attr`
constants of the GraphModule.

Before:  o = torch._C._nn.linear(attn, l_o_proj_weight, None)
After:   a = attn[..., 32:64]; p = torch._C._nn.linear(a, _cpcompile_w3, None)
         r = _c10d_functional.all_reduce(p, 'sum', replica_group); o = _c10d_functional.wait_tensor(r)
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx

from cpcompile.passes._fx import insert_call, is_op, shape, val
from cpcompile.passes.local_layouts import mark_local
from cpcompile.passes.shard_weights import RankWeights, WeightShard

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext

_c10d = torch.ops._c10d_functional


def all_reduce(g: fx.Graph, x: fx.Node, group_name: str) -> fx.Node:
    r = insert_call(g, _c10d.all_reduce.default, (x, "sum", group_name))
    return insert_call(g, _c10d.wait_tensor.default, (r,))


def graph_constant(gm: fx.GraphModule, tensor: torch.Tensor, prefix: str) -> fx.Node:
    """`tensor` as a `get_attr` constant of `gm` (a local shard, an index), with its fake value."""
    i = 0
    while hasattr(gm, f"{prefix}{i}"):
        i += 1
    name = f"{prefix}{i}"
    gm.register_buffer(name, tensor)
    gm.meta["cpcompile_constants"] = True  # see backend.lower: AOT must not match these to Dynamo sources
    node = gm.graph.get_attr(name)
    fakes = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes]
    mode = next((v.fake_mode for v in fakes if hasattr(v, "fake_mode")), None)
    if mode is not None:
        node.meta["val"] = node.meta["example_value"] = mode.from_tensor(tensor, static_shapes=True)
    return node


def place_columns(gm: fx.GraphModule, y_loc: fx.Node, shard: WeightShard, width: int) -> fx.Node:
    """A column shard's output put back at this rank's columns of the full `width`, zeros elsewhere
    (`F.pad` for one block, else a pad by one zero column and an `index_select` that scatters)."""
    g = gm.graph
    block = shard.contiguous
    if block is not None:
        return insert_call(g, F.pad, (y_loc, (block[0], width - block[1])))
    n = len(shard.cols)
    perm = torch.full((width,), n, dtype=torch.long)  # column n: the one zero column
    perm[shard.cols] = torch.arange(n)
    padded = insert_call(g, F.pad, (y_loc, (0, 1)))
    device = val(y_loc).device if val(y_loc) is not None else "cpu"
    return insert_call(g, torch.Tensor.index_select, (padded, -1, graph_constant(gm, perm.to(device), "_cpcompile_idx")))


def shard_linears(
    gm: fx.GraphModule,
    weights: "RankWeights",
    ctx: "RankContext",
) -> dict[str, int]:
    """Returns counts: column / row linears rewritten, all-reduces inserted.
    Each placed column output is marked with the local value it stands for (`local_layouts.mark_local`)."""
    shards, local = weights.shards, weights.local
    g = gm.graph
    counts = {"column": 0, "row": 0, "all_reduce": 0}
    done = set()
    for lin in [n for n in g.nodes if is_op(n, "linear")]:
        name = lin.meta.get("cpcompile_weight")  # set by find_projections, by tensor identity
        if name not in shards or shards[name].kind not in ("column", "row"):
            continue  # replicated by the plan / vocab and experts (shard_vocab.py, shard_experts.py)
        done.add(name)
        shard = shards[name]
        w_loc, b_loc = local[name]
        dtype = val(lin.args[1]).dtype  # the model may cast its weight in the forward (W.to(x.dtype))
        w_loc = w_loc.to(dtype)
        b_loc = b_loc.to(val(lin.args[2]).dtype) if b_loc is not None and len(lin.args) > 2 and lin.args[2] is not None else b_loc
        x = lin.args[0]
        full = shape(lin)
        with g.inserting_before(lin):
            w_node = graph_constant(gm, w_loc, "_cpcompile_w")
            b_node = graph_constant(gm, b_loc, "_cpcompile_b") if b_loc is not None else None
            block = shard.contiguous
            if shard.kind == "column":
                y_loc = insert_call(g, torch._C._nn.linear, (x, w_node, b_node))
                y_loc.meta["cpcompile_weight"] = name
                y = place_columns(gm, y_loc, shard, full[-1])
                mark_local(y, y_loc, -1, shard.cols.tolist(), full[-1], shard.group, ctx.name(shard.group), ctx.size(shard.group))
            else:
                if block is not None:
                    x_loc = insert_call(g, operator.getitem, (x, (Ellipsis, slice(*block))))
                else:
                    idx = graph_constant(gm, shard.cols.to(w_loc.device), "_cpcompile_idx")
                    x_loc = insert_call(g, torch.Tensor.index_select, (x, -1, idx))
                partial = insert_call(g, torch._C._nn.linear, (x_loc, w_node, None))
                partial.meta["cpcompile_weight"] = name
                y = all_reduce(g, partial, ctx.name(shard.group))
                counts["all_reduce"] += 1
                if b_node is not None:
                    y = insert_call(g, operator.add, (y, b_node))
                y.meta["cpcompile_row"] = {"weight": name, "partial": partial, "bias": b_node, "group": shard.group,
                                           "group_name": ctx.name(shard.group)}
        lin.replace_all_uses_with(y)
        g.erase_node(lin)
        counts[shard.kind] += 1
    missing = sorted(k for k in set(shards) - done if shards[k].kind in ("column", "row"))
    if missing:  # never a silent skip: the rank holds only the shard, so an unrewritten use would be wrong
        raise ValueError(
            f"cpcompile: the plan shards {len(missing)} weight(s) that this graph does not use through a linear it "
            f"recognised: {missing[:4]}{' ...' if len(missing) > 4 else ''}. The graph differs from the one captured "
            "at parallelize; please report this model."
        )
    g.lint()
    gm.recompile()
    return counts

"""Pass 5b — vocab-parallel token embedding and LM head (Megatron's VocabParallelEmbedding and
its column-parallel output layer, done on the graph).

Cases handled (a `WeightShard` of kind "vocab" per table, from `shard_weights.vocab_shard`; this
rank holds rows `[lo, lo + n)` of the [V, H] table, zero padded to `Vl = ceil(V / r)` rows, r the
replica's tp*cp ranks):
  * embedding lookup `e = embedding(ids, W)`: a masked lookup into the local rows, then one
    all-reduce over the replica. Exactly one rank contributes each token's row and the others add
    zeros, so the sum is the row itself, bit for bit. Marked `meta["cpcompile_row"]` (role
    'embedding') so that split_tokens turns the all-reduce into the reduce-scatter its token
    chunk needs under ffn='sp'.
  * LM head `y = linear(x, W, b)` with y [..., V]: the local logits [..., Vl], all-gathered over
    the replica (`all_gather_into_tensor` stacks the ranks' [M, Vl] on dim 0) and put back in vocab
    order; the padded columns are cut off, so padding never takes part in an argmax or a sample.
    Softcapping / logit scaling that follow the LM head are untouched: they see the full logits.
A tied embedding and LM head read the same local shard.

Before:  e = F.embedding(ids, W);  ...;  logits = linear(h, W_head)              # e [B, L, H]
After:   li = ids - lo;  inside = (li >= 0) & (li < n);  e_loc = F.embedding(where(inside, li, 0), W_loc)
         e = wait_tensor(all_reduce(where(inside[..., None], e_loc, 0), 'sum', replica))
         y = linear(h, W_head_loc)                                                # [B, L, Vl]
         g = wait_tensor(all_gather_into_tensor(y.reshape(M, Vl), r, replica))    # [r*M, Vl]
         logits = g.view(r, M, Vl).permute(1, 0, 2).reshape(M, r*Vl)[:, :V].reshape(B, L, V)
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx

from cpcompile.passes._fx import insert_call, is_op, shape
from cpcompile.passes.find_projections import embedding_args, is_embedding
from cpcompile.passes.shard_linears import all_reduce, graph_constant
from cpcompile.passes.shard_weights import RankWeights, WeightShard

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext

_c10d = torch.ops._c10d_functional


def shard_vocab(
    gm: fx.GraphModule,
    weights: "RankWeights",
    ctx: "RankContext",
) -> dict[str, int]:
    """Returns counts: embedding lookups and LM heads rewritten, all-reduces and all-gathers inserted."""
    shards, local = weights.shards, weights.local
    g = gm.graph
    counts = {"embedding": 0, "lm_head": 0, "all_reduce": 0, "all_gather": 0}
    vocab = {k: s for k, s in shards.items() if s.kind == "vocab"}
    done = set()
    consts: dict[str, fx.Node] = {}
    for n in list(g.nodes):
        name = n.meta.get("cpcompile_weight")
        if name not in vocab or not (is_embedding(n) or is_op(n, "linear")):
            continue
        shard, (w_loc, b_loc) = vocab[name], local[name]
        done.add(name)
        group = ctx.name(shard.group)
        with g.inserting_before(n):
            if name not in consts:
                consts[name] = graph_constant(gm, w_loc, "_cpcompile_w")
            if is_embedding(n):
                y = _embedding(g, n, shard, consts[name], group)
                counts["embedding"] += 1
                counts["all_reduce"] += 1
            else:
                b_node = graph_constant(gm, b_loc.to(w_loc.dtype), "_cpcompile_b") if b_loc is not None else None
                y = _lm_head(g, n, shard, consts[name], b_node, group, ctx.size(shard.group))
                counts["lm_head"] += 1
                counts["all_gather"] += 1
        n.replace_all_uses_with(y)
        g.erase_node(n)
    missing = sorted(set(vocab) - done)
    if missing:
        raise ValueError(
            f"cpcompile: the plan splits the vocab of {missing}, but this graph reads it through no embedding lookup "
            "or LM head it recognised. A model called with inputs_embeds needs vocab='replicate' (its embedding is "
            "computed outside the graph); otherwise please report this model."
        )
    g.lint()
    gm.recompile()
    return counts


def _embedding(g: fx.Graph, n: fx.Node, shard: WeightShard, w_node: fx.Node, group: str) -> fx.Node:
    ids, _ = embedding_args(n)
    if n.target is F.embedding and len(n.args) > 3 and n.args[3] is not None:
        raise ValueError(f"cpcompile: the embedding {shard.weight} renormalises its rows (max_norm), which rewrites the "
                         "table; it cannot be vocab-parallel. Use vocab='replicate'.")
    lo, rows = (int(shard.cols[0]), len(shard.cols)) if len(shard.cols) else (0, 0)
    li = insert_call(g, operator.sub, (ids, lo))
    inside = insert_call(g, operator.and_, (insert_call(g, operator.ge, (li, 0)), insert_call(g, operator.lt, (li, rows))))
    safe = insert_call(g, torch.where, (inside, li, 0))
    e_loc = insert_call(g, F.embedding, (safe, w_node))
    e_loc.meta["cpcompile_local_embedding"] = True  # split_tokens: not the replica's embedding output
    partial = insert_call(g, torch.where, (insert_call(g, torch.unsqueeze, (inside, -1)), e_loc, 0.0))
    y = all_reduce(g, partial, group)
    y.meta["cpcompile_row"] = {"weight": shard.weight, "partial": partial, "bias": None, "group": shard.group,
                               "role": "embedding"}
    return y


def _lm_head(g: fx.Graph, n: fx.Node, shard: WeightShard, w_node: fx.Node, b_node, group: str, size: int) -> fx.Node:
    full = shape(n)  # [..., V]
    v, vl = full[-1], shard.local_rows
    m = int(torch.Size(full[:-1]).numel())
    y = insert_call(g, torch._C._nn.linear, (n.args[0], w_node, b_node))
    y.meta["cpcompile_weight"] = shard.weight  # split_tokens: the LM head needs every token
    flat = insert_call(g, torch.reshape, (y, (m, vl)))
    gathered = insert_call(g, _c10d.wait_tensor.default,
                           (insert_call(g, _c10d.all_gather_into_tensor.default, (flat, size, group)),))
    ordered = insert_call(g, torch.Tensor.permute, (insert_call(g, torch.reshape, (gathered, (size, m, vl))), (1, 0, 2)))
    logits = insert_call(g, torch.reshape, (ordered, (m, size * vl)))
    if size * vl != v:
        logits = insert_call(g, operator.getitem, (logits, (slice(None), slice(0, v))))
    return insert_call(g, torch.reshape, (logits, full))

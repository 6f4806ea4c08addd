"""Pass 2b — this rank's weight shards: which columns of every sharded linear it owns.

Runs once, at `parallelize`, on the captured single-device graph. For each linear the plan
did not replicate it decides this rank's columns by dataflow (dependency probing,
`_probe.py`), so fused and packed layouts need no per-model code:

  * q/k/v/qkv (column over tp): the output columns that feed this TP rank's query heads
    (`Hq/tp` of them) and KV heads (`Hkv/tp`, or the one head they read when tp > Hkv).
  * o (row): the input columns fed by the heads this rank holds after the CP combine —
    `Hq/(tp*cp)` heads for all_to_all / ag_rs, `Hq/tp` for all_gather.
  * down/fc2 (row over the FFN group: the replica, the tp group under ffn='sp', every rank
    under ffn='world_tp'): input chunk `r` of `I/size` (r = this rank in that group);
    gate/up/fc1/gate_up (column): the output columns that feed that chunk.
  * expert_up / expert_down (MoE, `expert_shards`), over the MoE group (the FFN group; the replica
    under ffn='world_tp'). moe='tp': expert_down's input chunk `r` of `I/size` in every expert
    (kind "expert-row") and expert_up's output columns that feed it (found by probing, so a packed
    gate_up, concatenated or interleaved, needs no rule; "expert-column"). moe='ep': experts
    `[r*E/size, (r+1)*E/size)` whole (kind "expert"), `cols` then lists experts.
  * embedding / lm_head (vocab over the replica, `vocab_shard`): rows `[r*Vl, (r+1)*Vl)` of the
    [V, H] table, `Vl = ceil(V / (tp*cp))`; the last ranks' shards are zero padded to `Vl` rows
    (a padded row is never looked up, and its logit is dropped by the LM head's gather). A tied
    embedding and LM head share the one shard.

The result is a table `{parameter name: WeightShard}` and the local tensors; the graph rewrite
(`shard_linears.py`) executes it. Heads are split in contiguous blocks in head order.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

from cpcompile.kernels.layout import kv_head_range

from cpcompile.passes._probe import ProbeError, column_support, forward_support
from cpcompile.passes.find_projections import new_kv
from cpcompile.passes.plan import EXPERT_ROLES, FFN_ROLES, SHARED_EXPERT_ROLES, Placement

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext
    from cpcompile.passes import Analysis


@dataclass
class WeightShard:
    weight: str  # parameter name
    kind: str  # "column" | "row"
    group: str  # "tp" | "replica" | "world": the group a row shard's partial sums are reduced over
    cols: torch.Tensor  # column: this rank's output features; row: its input features (sorted)
    full_shape: tuple[int, int]  # the linear's [out, in]
    bias: str | None = None  # the bias parameter's name
    transposed: bool = False  # the parameter is stored [in, out] (Conv1D): its columns are the outputs
    local_rows: int = 0  # vocab: rows of the local table, `cols` (the real ones) then zero padding

    @property
    def contiguous(self) -> tuple[int, int] | None:
        c = self.cols
        if len(c) and int(c[-1]) - int(c[0]) + 1 == len(c):
            return int(c[0]), int(c[-1]) + 1
        return None


def head_ranges(ctx: "RankContext", hq: int) -> dict[str, tuple[int, int]]:
    """Query-head ranges of this rank: `tp` (attended here), `out` (held after the combine)."""
    per_tp = hq // ctx.tp
    q0 = ctx.tp_rank * per_tp
    if ctx.combine == "all_gather" or ctx.cp == 1:
        return {"tp": (q0, q0 + per_tp), "out": (q0, q0 + per_tp)}
    per_cp = per_tp // ctx.cp
    o0 = q0 + ctx.cp_rank * per_cp
    return {"tp": (q0, q0 + per_tp), "out": (o0, o0 + per_cp)}


def _heads_mask(x: torch.Tensor, h0: int, h1: int) -> torch.Tensor:
    m = torch.zeros(x.shape, dtype=torch.bool)
    m[:, h0:h1] = True
    return m


@dataclass
class RankWeights:
    """This rank's share of the weights, decided at `parallelize`: the shards and the local copies
    the sharding passes put into the graph."""

    shards: dict[str, WeightShard]  # parameter name -> WeightShard
    local: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # parameter name -> (local weight, local bias | None)


def shard_weights(analysis: "Analysis", ctx: "RankContext") -> dict[str, WeightShard]:
    """This rank's shards: the plan's sharded placements (`analysis.placements`, planned for `ctx`'s mesh)
    made into columns."""
    if analysis.mesh != ctx.mesh:
        raise ValueError(f"shard_weights: the plan is for {analysis.mesh}, this rank's context for {ctx.mesh}")
    shards: dict[str, WeightShard] = {}
    by_layer: dict[int, list[Placement]] = {}
    for pl in analysis.placements:
        by_layer.setdefault(pl.layer, []).append(pl)
    for site in analysis.sites:
        try:
            _shard_site(shards, site, by_layer.get(site.index, []), ctx)
        except ProbeError as e:
            raise ProbeError(f"cpcompile: layer {site.index}: {e}. Run with tp = cp = 1 (see cpcompile.explain).") from e
    for pl in analysis.placements:
        if pl.role == "expert_down" and pl.sharded:
            up = next(q for q in analysis.placements if q.role == "expert_up" and q.projection.offsets is pl.projection.offsets)
            shards.update(expert_shards(up, pl, ctx))
        if pl.kind == "vocab":
            shards[pl.weight] = vocab_shard(pl, ctx)
    return shards


def expert_shards(up: Placement, down: Placement, ctx: "RankContext") -> dict[str, WeightShard]:
    group, kind = down.group, down.kind
    size, r = ctx.size(group), ctx.group_rank(group)
    up, down = up.projection, down.projection
    if kind == "expert":  # moe='ep': whole experts
        per = down.experts // size
        experts = torch.arange(r * per, (r + 1) * per)
        return {p.weight: WeightShard(p.weight, "expert", group, experts, (p.out_features, p.in_features), None, p.transposed)
                for p in (up, down)}
    per = down.in_features // size
    c0, c1 = r * per, (r + 1) * per
    cols = column_support(up.node, down.node.args[0], lambda t: t[..., c0:c1])
    return {
        up.weight: WeightShard(up.weight, "expert-column", group, cols, (up.out_features, up.in_features), None, up.transposed),
        down.weight: WeightShard(down.weight, "expert-row", group, torch.arange(c0, c1), (down.out_features, down.in_features),
                                 None, down.transposed),
    }


def vocab_shard(pl: Placement, ctx: "RankContext") -> WeightShard:
    """Rows `[r*Vl, min((r+1)*Vl, V))` of a [V, H] table, `Vl = ceil(V / size)`, r = this rank in the placement's group."""
    p, group = pl.projection, pl.group
    size, r = ctx.size(group), ctx.group_rank(group)
    v = p.out_features
    per = -(-v // size)
    rows = torch.arange(min(r * per, v), min((r + 1) * per, v))
    return WeightShard(p.weight, "vocab", group, rows, (p.out_features, p.in_features), p.bias, p.transposed, per)


def _shard_site(shards: dict[str, WeightShard], site, layer: list[Placement], ctx: "RankContext") -> None:
    """The shards of one attention site's projections and of its layer's FFN, into `shards`."""
    dense_ffn = FFN_ROLES + SHARED_EXPERT_ROLES  # a shared expert is sharded as a dense FFN
    d = site.dims
    heads = head_ranges(ctx, d["Hq"])
    kv0, kv1 = kv_head_range(d["Hkv"], ctx.tp, ctx.tp_rank)
    new_k, new_v = new_kv(site)
    ffn_row = None
    for pl in layer:
        p = pl.projection
        if not pl.sharded or p.role in EXPERT_ROLES:
            continue  # experts: expert_shards
        kind, group = ("row" if pl.kind == "row" else "column"), pl.group
        lin = p.node
        if kind == "column" and p.role not in dense_ffn:
            cols = []
            if "q" in p.role:
                cols.append(column_support(lin, site.query, lambda t: t[:, heads["tp"][0] : heads["tp"][1]]))
            if "k" in p.role:
                cols += [column_support(lin, n, lambda t: t[:, kv0:kv1]) for n in new_k]
            if "v" in p.role:
                cols += [column_support(lin, n, lambda t: t[:, kv0:kv1]) for n in new_v]
            if not cols:
                raise ValueError(f"shard_weights: {p.weight} ({p.role}) has no column rule")
            shards[p.weight] = _shard(p, kind, group, torch.cat(cols).unique())
        elif p.role == "o":
            h0, h1 = heads["out"]
            cols = forward_support(site.output, lin.args[0], lambda x: _heads_mask(x, h0, h1))
            others = forward_support(site.output, lin.args[0], lambda x: ~_heads_mask(x, h0, h1))
            mixed = sorted(set(cols.tolist()) & set(others.tolist()))
            if mixed:  # e.g. a norm over all heads before o_proj (BitNet's attn_sub_norm)
                raise ValueError(
                    f"cpcompile: layer {site.index}: {len(mixed)} of the {p.in_features} input features of {p.weight} (o) "
                    f"depend on this rank's heads {h0}..{h1 - 1} and on other heads too (an op mixing the heads between "
                    "attention and o_proj, such as a norm over the whole attention output). A row-parallel o_proj "
                    "would then read a partial input: cpcompile cannot shard this layer's heads in this version. Run "
                    "with tp = cp = 1 (and see cpcompile.explain)."
                )
            shards[p.weight] = _shard(p, "row", group, cols)
        elif kind == "row":  # down / fc2 over the FFN group
            size, r = ctx.size(group), ctx.group_rank(group)
            per = p.in_features // size
            cols = torch.arange(r * per, (r + 1) * per)
            shards[p.weight] = _shard(p, "row", group, cols)
            ffn_row = (p, r * per, (r + 1) * per)
    for pl in layer:  # FFN column shards: the columns that feed this rank's chunk of down's input
        p = pl.projection
        if p.role in dense_ffn and pl.kind in ("column", "packed-column"):
            if ffn_row is None:
                raise ValueError(f"shard_weights: {p.weight} ({p.role}) is column-parallel but layer {site.index} has no down/fc2")
            down, c0, c1 = ffn_row
            cols = column_support(p.node, down.node.args[0], lambda t: t[..., c0:c1])
            shards[p.weight] = _shard(p, "column", pl.group, cols)


def _shard(p, kind: str, group: str, cols: torch.Tensor) -> WeightShard:
    return WeightShard(p.weight, kind, group, cols, (p.out_features, p.in_features), p.bias, p.transposed)


def local_tensors(shard: WeightShard, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's copy of a weight (and bias), in linear's [out, in] orientation: rows for column
    shards, columns for row shards (of the transpose, for a weight stored [in, out])."""
    idx = shard.cols.to(weight.device)
    if shard.kind.startswith("expert"):  # kept as stored: [E, out, in], or [E, in, out] when transposed
        out_dim, in_dim = (2, 1) if shard.transposed else (1, 2)
        dim = {"expert": 0, "expert-column": out_dim, "expert-row": in_dim}[shard.kind]
        return weight.index_select(dim, idx).contiguous(), None
    if shard.transposed:
        weight = weight.t()
    if shard.kind == "vocab":
        return pad_rows(weight.index_select(0, idx), shard.local_rows), (
            pad_rows(bias.index_select(0, idx), shard.local_rows) if bias is not None else None)
    if shard.kind == "column":
        return weight.index_select(0, idx).contiguous(), (bias.index_select(0, idx).contiguous() if bias is not None else None)
    return weight.index_select(1, idx).contiguous(), (bias.detach().clone() if bias is not None else None)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (a vocab shard of the last ranks)."""
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])

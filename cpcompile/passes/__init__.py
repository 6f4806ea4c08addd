"""The pass manager: cpcompile's passes, in their fixed order.

0. normalize_linears — every projection form (x @ W.T, addmm, ...) -> linear. (canonicalises)
1. find_attention    — attention sites (SDPA / eager forms), their K/V source;  (reads)
                       absorb_latent.find_latent: MLA's K/V made from a cached latent.
2. find_projections  — every linear's role, by dataflow.                       (reads)
3. plan              — role -> placement under the mesh, validated.            (reads)
4. rewrite_attention — cache read + attention -> attention_with_lse over this rank's heads
                       and slots, plus the CP combine collectives; MLA sites are absorbed
                       into attention over the cached latent (absorb_latent). (rewrites)
5. shard_linears     — sharded projections -> local linears + all-reduces.     (rewrites)
5b. shard_vocab      — embedding lookups and the LM head over this rank's vocab rows,
                       + an all-reduce / all-gather over the replica.           (rewrites)
5c. shard_experts    — MoE grouped matmuls over this rank's expert columns (moe='tp') or
                       experts (moe='ep'), + one all-reduce after the routed combine. (rewrites)
5d. local_layouts    — the sharded activations stay local from the linears, expert
                       matmuls and attention of 4-5c to their row-parallel consumers
                       (no full-width pad); a norm over a sharded dim all-reduces its
                       statistic.                                               (rewrites)
6. gather_replicas   — dp > 1: the replica-layout marker out; in global mode the
                       outputs all-gathered over the dp group.                  (rewrites)
7. split_tokens      — ffn='sp' / 'world_tp': the token layout outside attention
                       (reduce-scatter after o_proj / down, all-gathers).       (rewrites)

(Pass 2b, shard_weights, runs once at `parallelize` on the captured graph: it decides each
rank's columns; passes 4 and 5 execute that on every graph Dynamo produces.)

Analysis runs before any rewrite (pass 0 only spells projections one way) so that roles are read off the graph HF produced, and the
plan is validated before the graph is touched: a mesh error never leaves a half-rewritten
graph. Each pass's counts are returned in `PassReport`; tests assert them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from cpcompile.options import Options

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext
from cpcompile.passes._fx import descendants, is_op, op_count
from cpcompile.passes.find_attention import AttentionSite, find_attention_sites
from cpcompile.passes.find_projections import Roles, find_projections
from cpcompile.passes.normalize_linears import normalize_linears, unrecognised_products
from cpcompile.passes.plan import Mesh, Placement, plan
from cpcompile.passes.rewrite_attention import rewrite_attention
from cpcompile.passes.gather_replicas import gather_replicas, replica_layout
from cpcompile.passes.shard_linears import shard_linears
from cpcompile.passes.local_layouts import keep_local
from cpcompile.passes.shard_vocab import shard_vocab
from cpcompile.passes.shard_experts import shard_experts
from cpcompile.passes.shard_weights import RankWeights
from cpcompile.passes.split_tokens import split_tokens


@dataclass
class Analysis:
    sites: list[AttentionSite]
    roles: Roles
    placements: list[Placement]  # the plan (pass 3): one per `roles.projections`, in that order, under `mesh`
    notes: list[str] = field(default_factory=list)  # what the passes saw but did not understand
    mesh: Mesh = field(default_factory=Mesh)  # the mesh `placements` were planned for

    def placement(self, weight: str) -> Placement:
        """The plan's row for the projection of parameter `weight`."""
        return next(p for p in self.placements if p.weight == weight)


@dataclass
class PassReport:
    analysis: Analysis
    counts: dict[str, int] = field(default_factory=dict)


def analyze(gm: fx.GraphModule, options: Options, names: dict[fx.Node, str] | None = None, latents: dict | None = None) -> Analysis:
    """`names`: the graph's weight inputs -> parameter names (`find_projections.input_names`);
    None only for a bare single-device function (names are then for display).

    First puts every projection in `linear` form (pass 0, normalize_linears: the one rewrite
    before analysis; it keeps the model's results)."""
    normalize_linears(gm, names)
    sites = find_attention_sites(gm, latents)
    roles = find_projections(gm, sites, names)
    mesh = Mesh(options.tp, options.cp, options.dp, options.combine, options.ffn, options.vocab, options.moe)
    return Analysis(sites, roles, plan(roles, sites, mesh), _notes(gm, sites, roles, names), mesh)


def _notes(gm: fx.GraphModule, sites: list[AttentionSite], roles: Roles, names=None) -> list[str]:
    notes = list(unrecognised_products(gm, names))
    in_attention = {n for s in sites for n in s.chain}
    routers = {p.node for p in roles.projections if p.role == "router"}
    routed = set().union(*(descendants([r], lambda n: False) for r in routers)) if routers else set()
    for n in gm.graph.nodes:
        if is_op(n, "softmax") and n not in in_attention and n not in routed:
            notes.append(f"softmax {n.name} is not part of an attention (a router?); left as is")
    for p in roles.projections:
        if p.role in ("other", "ffn_other"):
            notes.append(f"linear {p.weight} ({p.role}): structure not recognised; replicated on every rank")
        elif p.role == "shared":
            notes.append(f"linear {p.weight} (shared): the weight is used in more than one place; replicated on every rank")
    return notes


COLLECTIVES = {  # kind (PassReport counts) -> functional collective op
    "all_reduce": "all_reduce",
    "all_to_all": "all_to_all_single",
    "all_gather": "all_gather_into_tensor",
    "reduce_scatter": "reduce_scatter_tensor",
}


def count_collectives(gm: fx.GraphModule) -> dict[str, int]:
    """Collectives of each kind in the graph (one run of the graph issues exactly these)."""
    return {k: len(v) for k, v in _collective_nodes(gm).items()}


def collective_bytes(gm: fx.GraphModule) -> dict[str, int]:
    """Bytes each kind of collective sends into the group per run: its input tensor's size
    (static shapes, so this is what every run of the graph moves)."""
    from cpcompile.passes._fx import val

    out = {}
    for k, nodes in _collective_nodes(gm).items():
        out[k] = sum(val(n.args[0]).numel() * val(n.args[0]).element_size() for n in nodes)
    return out


def _collective_nodes(gm: fx.GraphModule) -> dict[str, list]:
    import torch

    ops = torch.ops._c10d_functional
    return {
        k: [n for n in gm.graph.nodes if n.op == "call_function" and n.target is getattr(ops, op).default]
        for k, op in COLLECTIVES.items()
    }


def run_passes(
    gm: fx.GraphModule, options: Options, graph_id: int = 0, ctx: "RankContext | None" = None,
    weights: RankWeights | None = None, names: dict[fx.Node, str] | None = None, latents: dict | None = None,
) -> PassReport:
    """`ctx`, `weights`: this rank and its weight shards (None on one device, both given otherwise).
    `latents`: layer -> the MLA structure read on an earlier graph (`absorb_latent.find_latent`)."""
    if (ctx is None) != (weights is None):
        raise ValueError("cpcompile: run_passes takes a rank context and its weights together, or neither")
    if ctx is not None and names is None:
        raise ValueError("cpcompile: a sharded graph needs the model's parameter names (by identity); use parallelize")
    dump = _Dumper(options.debug_dir, graph_id)
    dump(gm, "0-input")
    analysis = analyze(gm, options, names, latents)
    counts = {
        "attention_sites": len(analysis.sites),
        "sdpa_before": op_count(gm, "sdpa"),
        "cache_reads_before": op_count(gm, "kv_cache_read"),
    }
    result = rewrite_attention(gm, analysis.sites, ctx)
    dump(gm, "1-rewrite_attention")
    if ctx is not None:
        counts["linears_sharded"] = sum(shard_linears(gm, weights, ctx).values())
        dump(gm, "2-shard_linears")
        vocab = shard_vocab(gm, weights, ctx)
        counts["vocab_sharded"] = vocab["embedding"] + vocab["lm_head"]
        dump(gm, "2b-shard_vocab")
        experts = shard_experts(gm, weights, ctx, {p.weight: p.role for p in analysis.roles.projections})
        counts["experts_sharded"] = experts["expert_tp"] + experts["expert_ep"]
        dump(gm, "2c-shard_experts")
        local = keep_local(gm)  # after every pass that pads a shard back to full width
        counts.update({f"local_{k}": v for k, v in local.items()})
        dump(gm, "2d-local_layouts")
        layout = replica_layout(gm)
        if options.dp > 1:
            gather_replicas(gm, ctx, options.dp_inputs == "global")
            dump(gm, "3-gather_replicas")
        if options.ffn == "sp" and options.cp > 1 or options.ffn == "world_tp" and options.dp > 1:
            counts["split_tokens"] = split_tokens(gm, analysis.placements, ctx, tokens=layout[1] if layout else None)
            dump(gm, "4-split_tokens")
    counts["ffn_tokens"] = ffn_tokens(gm, analysis)
    counts["collectives"] = count_collectives(gm)
    counts["collective_bytes"] = collective_bytes(gm)
    counts.update(
        attention_rewritten=result.rewritten,
        latent_absorbed=result.latent_absorbed,
        latent_expanded=result.latent_expanded,
        sdpa_after=op_count(gm, "sdpa"),
        cache_reads_after=op_count(gm, "kv_cache_read"),
        attention_with_lse=sum(n.target is _lse_op() for n in gm.graph.nodes),
    )
    return PassReport(analysis, counts)


def ffn_tokens(gm: fx.GraphModule, analysis: Analysis) -> list[int]:
    """Tokens each layer's FFN processes on this rank per run of the graph (padding included):
    the rows of down/fc2's input. The duplicated-work counter: `ceil(T/cp)` under ffn='sp'."""
    from cpcompile.passes._fx import shape
    down = {p.weight for p in analysis.roles.projections if p.role in ("down", "fc2", "shared_down")}
    out = []
    for n in gm.graph.nodes:
        if is_op(n, "linear"):
            if n.meta.get("cpcompile_weight") in down:
                s = shape(n.args[0])
                out.append(int(torch.Size(s[:-1]).numel()))
    return out


def _lse_op():
    import torch

    return torch.ops.cpcompile.attention_with_lse.default


class _Dumper:
    """Debug switch: writes each graph before and after each pass to `debug_dir`."""

    def __init__(self, debug_dir: str | None, graph_id: int):
        self.dir, self.graph_id = debug_dir, graph_id

    def __call__(self, gm: fx.GraphModule, stage: str) -> None:
        if not self.dir:
            return
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, f"graph{self.graph_id}-{stage}.py"), "w") as f:
            f.write(gm.print_readable(print_output=False))

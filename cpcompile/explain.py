"""`cpcompile.explain(model, tp=, cp=, dp=, ffn=)`: what the passes found and what they would do, at a glance.

    print(cpcompile.explain(model, tp=2, cp=2))
    print(cpcompile.explain(model, tp=2, cp=2, dp=2, ffn="sp"))

For each layer: the attention found (form, heads, head dims, mask/causal/softcap, cache),
each projection with its role and planned placement under the mesh; then where the tokens live
outside attention under `ffn` and the collectives each layer inserts (kind, group, what it
moves); anything the passes did not understand; whether the mesh fits (if not, the `MeshError`
`parallelize` would raise, with the (tp, cp) that do fit). An attention cpcompile cannot
rewrite raises `AttentionError` here, as it would at compile time.

The collectives are read off the plan (placements per role and the combine), not off a compiled
graph; tests/test_cli_generate.py checks them against the pass report of a real decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpcompile.options import COMBINES, FFNS, Options
from cpcompile.passes import Analysis
from cpcompile.passes.plan import FFN_ROLES, Mesh, MeshError, _problems, placement_for, valid_meshes, validate_mesh

# as split_tokens.ATTENTION_INPUT_ROLES: the projections that need every token of the replica
_ATTENTION_INPUTS = ("q", "k", "v", "qkv", "kv", "qk", "qv", "q_down", "kv_down", "mla_q")
_ROW_FFN = ("down", "fc2", "shared_down")


@dataclass(frozen=True)
class Collective:
    """One collective a pass inserts: its kind (as in PassReport counts["collectives"]), its group, what it moves."""

    kind: str  # all_reduce | all_to_all | all_gather | reduce_scatter
    group: str  # tp | cp | dp | replica | world
    what: str

    def __str__(self) -> str:
        return f"{self.kind}({self.group})"


def token_layout(mesh: Mesh) -> str:
    """Where the tokens of a forward live outside attention (split_tokens.py), in one line."""
    rows = (
        f"rows split over dp={mesh.dp} replicas (each replica runs attention and keeps KV for its own rows); "
        if mesh.dp > 1 else ""
    )
    if mesh.ffn == "sp" and mesh.cp > 1:
        return (
            f"{rows}ffn='sp': outside attention each CP rank keeps ceil(T/cp={mesh.cp}) of its replica's T tokens "
            f"(the residual stream, norms and FFN run on that chunk, zero padded); FFN tensor-parallel over tp={mesh.tp}"
        )
    if mesh.ffn == "world_tp" and mesh.dp > 1:
        return (
            f"{rows}ffn='world_tp': the FFN runs on the tokens of all {mesh.dp} replicas (each padded to the largest "
            f"count) with 1/{mesh.world} of its weights on every rank; attention and the residual stream keep the replica's own tokens"
        )
    same = {"sp": " (cp=1: one CP rank holds every token, so 'sp' is 'tp')",
            "world_tp": " (dp=1: the world is the replica, so 'world_tp' is 'tp')"}.get(mesh.ffn, "")
    return f"{rows}ffn='{mesh.ffn}'{same}: every rank of a replica holds all its tokens; FFN tensor-parallel over the replica's tp*cp={mesh.replica} ranks"


def layer_collectives(roles: set[str], has_attention: bool, mesh: Mesh, latent: bool = False, mla_uv: str = "after") -> list[Collective]:
    """The collectives one decoder layer with these projection roles inserts per forward, in order.
    `latent`: an MLA layer, whose latent slots are split over the whole replica, so its combine runs
    over the replica's tp*cp ranks (Helix's KV parallelism) rather than the cp group."""
    out: list[Collective] = []
    sp = mesh.ffn == "sp" and mesh.cp > 1
    world_tp = mesh.ffn == "world_tp" and mesh.dp > 1
    if sp and roles & set(_ATTENTION_INPUTS):
        out.append(Collective("all_gather", "cp", "the normed token chunks before q/k/v: attention needs every token of the replica"))
    group, n = ("replica", mesh.replica) if latent else ("cp", mesh.cp)
    what = ("partial o and lse" if not latent else "latent o (kv_lora_rank wide) and lse" if mla_uv == "after"
            else "o up-projected by W_UV (v_head_dim wide) and lse")
    if has_attention and n > 1:
        if mesh.combine == "all_to_all":
            out.append(Collective("all_to_all", group, f"{what}, 1/{group} of the heads to each rank (Helix combine)"))
        elif mesh.combine == "ag_rs":
            out.append(Collective("all_gather", group, f"lse of every {group} rank (DCP combine)"))
            out.append(Collective("reduce_scatter", group, f"the rescaled {what.replace(' and lse', '')}, 1/{group} of the heads to each rank"))
        else:
            out.append(Collective("all_gather", group, f"{what} of every {group} rank (each merges all heads)"))
    if "o" in roles:
        out += _row("o", "o_proj", mesh, reshard=sp)
    if sp and "expert_down" in roles:
        out.append(Collective("all_gather", "cp", "the MoE block's input token chunks: routing and the grouped matmuls are not token-wise"))
    if world_tp and roles & set(FFN_ROLES):
        out.append(Collective("all_gather", "dp", "the FFN input: the tokens of every replica, each padded to the largest"))
    expert = placement_for("expert_down", mesh)
    routed = "expert_down" in roles and expert != "replicate"
    for role in _ROW_FFN:
        if role in roles and not (role == "shared_down" and routed):  # merged into the experts' (shard_experts.py)
            out += _row(role, role, mesh, reshard=world_tp)
    if routed:
        shared = " + the shared expert's" if "shared_down" in roles else ""
        out.append(Collective("all_reduce", expert.split("/")[-1], f"the routed experts' partial outputs{shared}, after the top-k combine"))
    return out


def latent_layout(site, mesh: Mesh, mla_uv: str = "after") -> str:
    """Where an MLA layer's latent and heads live under `mesh` (absorb_latent.py), in one line."""
    lat, n = site.latent, mesh.replica
    held = site.dims["Hq"] // (mesh.tp if mesh.combine == "all_gather" else n)
    uv = (f"after the combine it holds {held} heads, up-projects them through W_UV ({lat.rank} -> {lat.dv})" if mla_uv == "after"
          or n == 1 else f"it up-projects all {lat.heads} heads through W_UV ({lat.rank} -> {lat.dv}) before the combine, then holds {held}")
    return (f"latent slots over the replica's tp*cp={n} ranks ({lat.rank + lat.rope} values per token, 1/{n} of them here); "
            f"every rank forms all {lat.heads} absorbed queries (mla_q, kv_b replicated) and attends its slots; {uv} and feeds o_proj")


def _row(role: str, name: str, mesh: Mesh, reshard: bool) -> list[Collective]:
    """A row-parallel projection's partial sums: an all-reduce over its group, or the reduce-scatter
    split_tokens puts in its place (o under sp, down under world_tp)."""
    placement = placement_for(role, mesh)
    if placement == "replicate":
        return []
    group = placement.split("/")[-1]
    if reshard and role == "o" and group == "replica":
        out = [Collective("reduce_scatter", "cp", f"{name} partial sums, leaving each CP rank its token chunk")]
        if mesh.tp > 1:
            out.append(Collective("all_reduce", "tp", f"{name} partial sums over the tp ranks"))
        return out
    if reshard and group == "world":
        out = [Collective("reduce_scatter", "dp", f"{name} partial sums, each replica taking back its own tokens")]
        if mesh.replica > 1:
            out.append(Collective("all_reduce", "replica", f"{name} partial sums over the replica's tp*cp ranks"))
        return out
    return [Collective("all_reduce", group, f"{name} partial sums")]


def forward_collectives(mesh: Mesh, roles: set[str] = frozenset()) -> list[Collective]:
    """The collectives outside the decoder layers, per forward, for the outside-layer `roles` the
    model has (embedding, lm_head); dp_inputs='global' adds the last."""
    out = []
    sp = mesh.ffn == "sp" and mesh.cp > 1
    vocab = lambda role: role in roles and placement_for(role, mesh) != "replicate"
    if vocab("embedding"):
        if sp:
            out.append(Collective("reduce_scatter", "cp", "the vocab-parallel embedding's lookups, leaving each CP rank its token chunk"))
            if mesh.tp > 1:
                out.append(Collective("all_reduce", "tp", "the embedding's lookups over the tp ranks"))
        else:
            out.append(Collective("all_reduce", "replica", "the vocab-parallel embedding: each rank's masked lookup into its rows"))
    if sp:
        out.append(Collective("all_gather", "cp", "the final token chunks before the LM head"))
    if vocab("lm_head"):
        out.append(Collective("all_gather", "replica", "the LM head's logits, 1/(tp*cp) of the vocab from each rank"))
    if mesh.dp > 1:
        out.append(Collective("all_gather", "dp", "the logits of every replica, with dp_inputs='global' only"))
    return out


@dataclass
class Explanation:
    model: str
    mesh: Mesh
    kv_interleave: int
    analysis: Analysis
    problems: list[str]
    valid: list[tuple[int, int]]
    error: str = ""
    """The MeshError message `parallelize` would raise for this mesh ('' when it fits)."""
    mla_uv: str = "after"

    @property
    def ok(self) -> bool:
        return not self.problems

    def layer_collectives(self) -> dict[int, list[Collective]]:
        """layer -> the collectives it inserts per forward under this mesh."""
        out = {}
        for site in self.analysis.sites:
            roles = {p.role for p in self.analysis.roles.by_layer(site.index)}
            out[site.index] = layer_collectives(roles, True, self.mesh, site.latent is not None, self.mla_uv)
        return out

    def forward_collectives(self) -> list[Collective]:
        """The collectives outside the layers per forward (the embedding's, the LM head's, the logits')."""
        return forward_collectives(self.mesh, {p.role for p in self.analysis.roles.projections if p.layer < 0})

    def __str__(self) -> str:
        m = self.mesh
        lines = [
            f"cpcompile.explain: {self.model} at tp={m.tp}, cp={m.cp}, dp={m.dp} "
            f"(combine={m.combine}, ffn={m.ffn}, kv_interleave={self.kv_interleave}"
            + (f", vocab={m.vocab}" if m.vocab != "parallel" else "") + (f", moe={m.moe}" if m.moe != "tp" else "") + ")"
        ]
        projections = self.analysis.roles.projections
        width = max((len(p.weight) for p in projections), default=10)
        for site in self.analysis.sites:
            lines.append(f"layer {site.index}: {site.describe()}")
            if site.latent is not None:
                lines.append(f"    layout: {latent_layout(site, m, self.mla_uv)}")
            for p in (p for p in projections if p.layer == site.index):
                shape = f"[{p.out_features}, {p.in_features}]"
                shape = f"[{p.experts} x {p.out_features}, {p.in_features}]" if p.experts else shape
                lines.append(f"    {p.role:<11} {p.weight:<{width}} {shape:<16} {placement_for(p.role, m)}")
        for p in (p for p in projections if p.layer < 0):
            lines.append(f"outside layers: {p.role} {p.weight} [{p.out_features}, {p.in_features}] {placement_for(p.role, m)}")
        lines.append("not understood: " + ("nothing" if not self.analysis.notes else ""))
        lines += [f"    {n}" for n in self.analysis.notes]
        if not self.ok:
            lines.append("mesh does NOT fit (cpcompile.parallelize raises MeshError):")
            lines += [f"    {line}" for line in self.error.splitlines()]
            return "\n".join(lines)
        lines.append("mesh fits")
        lines.append(f"tokens: {token_layout(m)}")
        lines += _collective_lines(self.layer_collectives(), self.forward_collectives())
        lines.append(f"valid (tp, cp) with combine={m.combine}, dp={m.dp}, ffn={m.ffn}: {self.valid}")
        return "\n".join(lines)


def _collective_lines(per_layer: dict[int, list[Collective]], per_forward: list[Collective]) -> list[str]:
    groups: dict[tuple, list[int]] = {}  # layers with the same collectives are listed once
    for layer, cs in per_layer.items():
        groups.setdefault(tuple(cs), []).append(layer)
    lines = []
    for cs, layers in groups.items():
        which = f"each layer ({len(layers)})" if len(groups) == 1 else f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"
        lines.append(f"collectives per forward, {which}: " + (", ".join(map(str, cs)) if cs else "none"))
        lines += [f"    {str(c):<20} {c.what}" for c in cs]
    lines.append("collectives per forward, outside the layers: " + (", ".join(map(str, per_forward)) if per_forward else "none"))
    lines += [f"    {str(c):<20} {c.what}" for c in per_forward]
    return lines


def explain(
    model: torch.nn.Module,
    *,
    tp: int = 1,
    cp: int = 1,
    dp: int = 1,
    combine: str = "all_to_all",
    ffn: str = "tp",
    kv_interleave: int = 1,
    vocab: str = "parallel",
    moe: str = "tp",
    mla_uv: str = "after",
) -> Explanation:
    from cpcompile.loading import meta_parameters
    from cpcompile.parallelize import _meta_copy, capture

    if getattr(model, "_cpcompile", None) is not None:
        raise ValueError(
            "explain: this model is already parallelized (its sharded weights are stand-ins); call "
            "cpcompile.explain on the model before cpcompile.parallelize"
        )
    mesh = Mesh(tp, cp, dp, combine, ffn, vocab, moe)
    # analysed at tp = cp = 1: explain reports mesh problems, never raises on them. An empty model
    # (cpcompile.empty_model: parameters on meta) is traced on a meta copy, as parallelize does.
    analysis = capture(_meta_copy(model) if meta_parameters(model) else model, Options())
    problems = _problems(analysis.roles, analysis.sites, mesh)
    error = ""
    try:
        validate_mesh(analysis.roles, analysis.sites, mesh)
    except MeshError as e:
        error = str(e)
    # the same list MeshError gives (invalid settings fall back to the defaults there too)
    valid = valid_meshes(
        analysis.roles, analysis.sites, max(16, mesh.world), combine if combine in COMBINES else "all_to_all",
        max(dp, 1), ffn if ffn in FFNS else "tp", moe if moe in ("tp", "ep") else "tp",
    )
    return Explanation(type(model).__name__, mesh, kv_interleave, analysis, problems, valid, error, mla_uv)

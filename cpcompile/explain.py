"""`cpcompile.explain(model, tp=, cp=, dp=, ffn=)`: what the passes found and what they would do, at a glance.

    print(cpcompile.explain(model, tp=2, cp=2))
    print(cpcompile.explain(model, tp=2, cp=2, dp=2, ffn="sp"))

For each layer: the attention found (form, heads, head dims, mask/causal/softcap, cache),
each projection with its role and planned placement under the mesh; then where the tokens live
outside attention under `ffn` and the collectives each layer inserts (kind, group, what it
moves); anything the passes did not understand; whether the mesh fits (if not, the `MeshError`
`parallelize` would raise, with the (tp, cp) that do fit). An attention cpcompile cannot
rewrite raises `AttentionError` here, as it would at compile time.

The collectives are not predicted: explain runs the real passes (`run_passes`, every pass in its
order) on the graph of one decode step, as `parallelize`'s serving engine traces it (one row per
replica), for rank 0 under a stand-in rank context (group names "explain_tp", ...; the local
weights sliced from the model's, on meta for an empty model), and reads the collective nodes off
the rewritten graph: kind, group (from the group name), what they move and their layer (from the
linear or embedding they reduce or feed, else the module of the nearest node Dynamo traced). Every rank
inserts the same collectives (the plan and the passes are the same on every rank; only which
columns and slots it holds differ), so rank 0 stands for all.
The rewritten graph's counts (`count_collectives`, `collective_bytes`, local_layouts' `local_*`)
and the nodes local_layouts kept at full width are printed too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from cpcompile.options import COMBINES, FFNS, MOES, Options
from cpcompile.passes import COLLECTIVES, Analysis, PassReport
from cpcompile.passes.find_projections import is_embedding, is_grouped_mm
from cpcompile.passes.plan import Mesh, MeshError, placements, plan_problems, valid_meshes, validate_mesh

GROUPS = ("tp", "cp", "dp", "replica", "world")
_NAMES = {g: f"explain_{g}" for g in GROUPS}  # the stand-in group names explain's rank context carries


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


def latent_layout(site, mesh: Mesh, mla_uv: str = "after") -> str:
    """Where an MLA layer's latent and heads live under `mesh` (absorb_latent.py), in one line."""
    lat, n = site.latent, mesh.replica
    held = site.dims["Hq"] // (mesh.tp if mesh.combine == "all_gather" else n)
    uv = (f"after the combine it holds {held} heads, up-projects them through W_UV ({lat.rank} -> {lat.dv})" if mla_uv == "after"
          or n == 1 else f"it up-projects all {lat.heads} heads through W_UV ({lat.rank} -> {lat.dv}) before the combine, then holds {held}")
    return (f"latent slots over the replica's tp*cp={n} ranks ({lat.rank + lat.rope} values per token, 1/{n} of them here); "
            f"every rank forms all {lat.heads} absorbed queries (mla_q, kv_b replicated) and attends its slots; {uv} and feeds o_proj")


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
    report: PassReport | None = None
    """The passes' report on rank 0's decode-step graph (None when the mesh does not fit)."""
    collectives: list[tuple[int | None, Collective]] = field(default_factory=list)
    """Every collective of that graph, in graph order, with its layer (None: outside the layers)."""
    kept_full: list[str] = field(default_factory=list)
    """The nodes local_layouts kept at full width (`gm.meta["cpcompile_kept_full"]`)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def layer_collectives(self) -> dict[int, list[Collective]]:
        """layer -> the collectives it inserts per forward under this mesh."""
        out = {site.index: [] for site in self.analysis.sites}
        for layer, c in self.collectives:
            if layer is not None:
                out.setdefault(layer, []).append(c)
        return out

    def forward_collectives(self) -> list[Collective]:
        """The collectives outside the layers per forward (the embedding's, the LM head's, the logits')."""
        return [c for layer, c in self.collectives if layer is None]

    def __str__(self) -> str:
        m = self.mesh
        lines = [
            f"cpcompile.explain: {self.model} at tp={m.tp}, cp={m.cp}, dp={m.dp} "
            f"(combine={m.combine}, ffn={m.ffn}, kv_interleave={self.kv_interleave}"
            + (f", vocab={m.vocab}" if m.vocab != "parallel" else "") + (f", moe={m.moe}" if m.moe != "tp" else "") + ")"
        ]
        projections = self.analysis.roles.projections
        placed = {pl.weight: pl for pl in self.analysis.placements}
        width = max((len(p.weight) for p in projections), default=10)
        for site in self.analysis.sites:
            lines.append(f"layer {site.index}: {site.describe()}")
            if site.latent is not None:
                lines.append(f"    layout: {latent_layout(site, m, self.mla_uv)}")
            for p in (p for p in projections if p.layer == site.index):
                shape = f"[{p.out_features}, {p.in_features}]"
                shape = f"[{p.experts} x {p.out_features}, {p.in_features}]" if p.experts else shape
                lines.append(f"    {p.role:<11} {p.weight:<{width}} {shape:<16} {placed[p.weight]}")
        for p in (p for p in projections if p.layer < 0):
            lines.append(f"outside layers: {p.role} {p.weight} [{p.out_features}, {p.in_features}] {placed[p.weight]}")
        lines.append("not understood: " + ("nothing" if not self.analysis.notes else ""))
        lines += [f"    {n}" for n in self.analysis.notes]
        if not self.ok:
            lines.append("mesh does NOT fit (cpcompile.parallelize raises MeshError):")
            lines += [f"    {line}" for line in self.error.splitlines()]
            return "\n".join(lines)
        lines.append("mesh fits")
        lines.append(f"tokens: {token_layout(m)}")
        lines += _collective_lines(self.layer_collectives(), self.forward_collectives())
        counts = self.report.counts
        kinds = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter")
        lines.append("one decode step on rank 0 (one row per replica), read off the rewritten graph: collectives "
                     + ", ".join(f"{k} {counts['collectives'][k]}" for k in kinds) + "; bytes sent "
                     + ", ".join(f"{k} {counts['collective_bytes'][k]}" for k in kinds))
        if "local_seeds" in counts:
            lines.append("local layouts (local_layouts): " + ", ".join(
                f"{k} {counts['local_' + k]}" for k in ("seeds", "local", "ends", "statistics", "kept_full")))
        lines.append("kept at full width: " + ("none" if not self.kept_full else ""))
        lines += [f"    {k}" for k in self.kept_full]
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


def graph_collectives(gm, analysis: Analysis) -> list[tuple[int | None, Collective]]:
    """The collective nodes of a graph the passes rewrote under explain's rank context, in graph order:
    (layer or None for outside the layers, Collective). The layer is that of the projection the
    collective reduces or feeds (`_what`); for the others (the attention's combine, a norm's statistic)
    the decoder layer of the traced node nearest before it (a statistic: after it, the norm it is for),
    read off its module path."""
    ops = torch.ops._c10d_functional
    kinds = {getattr(ops, op).default: kind for kind, op in COLLECTIVES.items()}
    groups = {name: g for g, name in _NAMES.items()}
    roles = {p.weight: p.role for p in analysis.roles.projections}
    layer_of = {p.weight: p.layer if p.layer >= 0 else None for p in analysis.roles.projections}
    site_of = {}  # module index -> attention site (the same number for every standard decoder)
    for p in analysis.roles.projections:
        i = _module_index(p.weight)
        if p.layer >= 0 and i is not None:
            site_of.setdefault(i, p.layer)
    nodes = list(gm.graph.nodes)
    traced: list = [None] * len(nodes)  # per node: its decoder layer if Dynamo traced it in a module, else "?"
    for k, n in enumerate(nodes):
        stack = n.meta.get("nn_module_stack")
        i = _module_index(list(stack.values())[-1][0]) if stack else "?"
        traced[k] = "?" if i == "?" else site_of.get(i, i) if i is not None else None
    out = []
    for k, n in enumerate(nodes):
        if n.op != "call_function" or n.target not in kinds:
            continue
        kind = kinds[n.target]
        group = groups.get(n.args[-1], str(n.args[-1]))
        what, weight, after = _what(n, kind, group, roles)
        if weight is not None:
            layer = layer_of.get(weight)
        else:
            near = traced[k + 1:] if after else traced[k - 1::-1] if k else []
            layer = next((t for t in near if t != "?"), None)
        out.append((layer, Collective(kind, group, what)))
    return out


def _module_index(path: str) -> int | None:
    """12 for 'model.layers.12.self_attn' (or 'L['self'].model.layers.12'): the decoder layer of a module path."""
    m = re.search(r"\.(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


_VIEWS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute", "contiguous", "pad", "getitem",
          "to", "clone", "index_select", "wait_tensor", "expand", "cat")


def _what(n, kind: str, group: str, roles: dict[str, str]) -> tuple[str, str | None, bool]:
    """What a collective moves, read off the graph: the node it reduces or exchanges (a linear's partial
    sums, the attention's partial outputs, an embedding's lookups, a norm's statistic), or for a gather
    of activations, the linear it feeds. Returns (what, the parameter of that linear or embedding or
    None, whether the collective belongs to the traced code after it rather than before)."""
    src = _source(n)
    weight = src.meta.get("cpcompile_weight") if src is not None else None
    if src is not None and src.target is torch.ops.cpcompile.attention_with_lse.default:
        return {"all_to_all": f"partial o and lse, 1/{group} of the heads to each rank (Helix combine)",
                "reduce_scatter": f"the rescaled partial o, 1/{group} of the heads to each rank (DCP combine)"}.get(
            kind, f"partial o and lse of every {group} rank (the CP combine)"), None, False
    if kind == "all_gather":
        near = _view_source(n.args[0]).meta.get("cpcompile_weight")
        if near in roles:
            return f"the {roles[near]} output, 1/{group} of it from each rank", near, False
        user = _user(n)
        if user is None or user.op == "output":
            return f"the outputs (logits) of every {group} rank", "", False
        used = user.meta.get("cpcompile_weight")
        return f"the input of {roles.get(used, _op(user))}: every token of the {group} group", used, False
    if kind == "all_reduce" and _reaches(n, is_grouped_mm):  # shard_experts: one all-reduce after the top-k combine
        shared = " + the shared expert's" if roles.get(weight) == "shared_down" else ""
        return f"the routed experts' partial outputs{shared}, after the top-k combine", None, False
    if weight in roles:
        return (f"{roles[weight]} partial sums" + (f", each {group} rank keeping its share of the tokens"
                                                   if kind == "reduce_scatter" else "")), weight, False
    if src is not None and is_embedding(src):
        return (f"embedding partial sums" + (f", each {group} rank keeping its share of the tokens"
                                              if kind == "reduce_scatter" else "")), "", False
    if src is not None and _op(src) == "sum":
        return "a norm's statistic over a sharded width (local_layouts)", None, True
    return (_op(src) if src is not None else "?"), None, False


def _source(n, depth: int = 10):
    """The nearest node before collective `n` that names what it moves: an attention, a linear (its
    weight), an embedding lookup or a sum; breadth first over the inputs."""
    seen, frontier = set(), [a for a in n.all_input_nodes]
    for _ in range(depth):
        nxt = []
        for x in frontier:
            if x in seen:
                continue
            seen.add(x)
            if (x.target is torch.ops.cpcompile.attention_with_lse.default or x.meta.get("cpcompile_weight")
                    or is_embedding(x) or x.op == "call_function" and _op(x) == "sum"):
                return x
            nxt += x.all_input_nodes
        frontier = nxt
    return None


def _reaches(n, pred, depth: int = 16) -> bool:
    """Whether a node within `depth` inputs before `n` satisfies `pred`."""
    seen, frontier = set(), list(n.all_input_nodes)
    for _ in range(depth):
        nxt = []
        for x in frontier:
            if x not in seen:
                seen.add(x)
                if pred(x):
                    return True
                nxt += x.all_input_nodes
        frontier = nxt
    return False


def _view_source(x):
    """`x` before any views, pads and casts."""
    while x.op == "call_function" and _op(x) in _VIEWS and x.all_input_nodes:
        x = x.all_input_nodes[0]
    return x


def _user(n, depth: int = 12):
    """The first linear (or the graph's output) that reads what collective `n` gathered."""
    x = n
    for _ in range(depth):
        users = list(x.users)
        if not users:
            return None
        x = users[0]
        if x.op == "output" or x.meta.get("cpcompile_weight"):
            return x
    return None


def _op(n) -> str:
    t = n.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return name.split(".")[0].strip("_")


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
    from cpcompile.capture import capture, meta_copy

    if getattr(model, "_cpcompile", None) is not None:
        raise ValueError(
            "explain: this model is already parallelized (its sharded weights are stand-ins); call "
            "cpcompile.explain on the model before cpcompile.parallelize"
        )
    mesh = Mesh(tp, cp, dp, combine, ffn, vocab, moe)
    # analysed at tp = cp = 1 first: explain reports mesh problems, never raises on them. An empty model
    # (cpcompile.empty_model: parameters on meta) is traced on a meta copy, as parallelize does.
    traced = meta_copy(model) if meta_parameters(model) else model
    analysis = capture(traced, Options())
    problems = plan_problems(analysis.roles, analysis.sites, mesh)
    error = ""
    try:
        validate_mesh(analysis.roles, analysis.sites, mesh)
    except MeshError as e:
        error = str(e)
    # the same list MeshError gives (invalid settings fall back to the defaults there too)
    valid = valid_meshes(
        analysis.roles, analysis.sites, max(16, mesh.world), combine if combine in COMBINES else "all_to_all",
        max(dp, 1), ffn if ffn in FFNS else "tp", moe if moe in MOES else "tp",
    )
    # the plan at this mesh (roles and sites do not depend on it), unvalidated where it does not fit
    planned = replace(analysis, placements=placements(analysis.roles, mesh), mesh=mesh)
    out = Explanation(type(model).__name__, mesh, kv_interleave, planned, problems, valid, error, mla_uv)
    if not problems:
        options = Options(tp=tp, cp=cp, dp=dp, combine=combine, ffn=ffn, kv_interleave=kv_interleave, vocab=vocab, moe=moe,
                          mla_uv=mla_uv)
        out.report, gm = rank_graph(traced, options, planned)
        out.collectives = graph_collectives(gm, planned)
        out.kept_full = list(gm.meta.get("cpcompile_kept_full", []))
    return out


def rank_graph(model, options: Options, analysis: Analysis | None = None, rank: int = 0, rows: int = 1,
               tokens: int = 1, max_length: int = 64):
    """(pass report, rewritten graph) of rank `rank`'s forward of `rows` x `tokens` (default: a decode
    step) under `options`, every pass run with a context of placeholder group names and the local
    weights sliced from `model`; the graph is never run. `analysis`: `capture`'s at `options`' mesh
    (captured here when None). What explain reads; tests and benchmarks read the same graph."""
    from cpcompile.distributed import RankContext
    from cpcompile.capture import capture, trace_passes
    from cpcompile.passes.shard_weights import RankWeights, local_tensors, shard_weights

    if analysis is None:
        analysis = capture(model, options)
    ctx, weights = None, None
    if options.tp * options.cp * options.dp > 1:
        ctx = RankContext.of(options, rank, _NAMES)
        shards = shard_weights(analysis, ctx)
        params = dict(model.named_parameters())
        local = {}
        for name, shard in shards.items():
            bias = params[shard.bias].detach() if shard.bias and shard.bias in params else None
            local[name] = local_tensors(shard, params[name].detach(), bias)
        weights = RankWeights(shards, local)
    return trace_passes(model, options, analysis, ctx, weights, max_length, rows, tokens)

"""Pass 2 — plan: role -> placement under the mesh, validated with actionable errors.

The plan is data (one table, as gpt-fast's `tp.py`): each role maps to how its weight is
split and over which group (`DESIGN.md` sections 1-3). Validation names the numbers and lists
the meshes this model can take.

| role                     | placement (combine all_to_all / ag_rs)  | all_gather combine |
|--------------------------|-----------------------------------------|--------------------|
| q, k, v                  | column over tp, by heads                | same               |
| qkv, kv (fused)          | packed column over tp, by heads         | same               |
| o                        | row over the replica (tp*cp ranks)      | row over tp        |
| gate, up, fc1            | column over the FFN group (below)       | same               |
| gate_up                  | packed column over the FFN group        | same               |
| down, fc2                | row over the FFN group                  | same               |
| expert_up (MoE)          | moe='tp': expert-column over the FFN group; moe='ep': expert (E/n experts each) | same |
| expert_down (MoE)        | moe='tp': expert-row over the FFN group;    moe='ep': expert                  | same |
| shared_gate/up/down      | column / column / row over the MoE group| same               |
| embedding, lm_head       | vocab rows over the replica (`vocab`)   | same               |
| q_down, kv_down (latents)| replicate                               | same               |
| mla_q, kv_up (MLA)       | replicate: every rank attends all heads over its latent slots (Helix) | same |
| ffn_other, shared, other |                                         |                    |

The FFN group follows `ffn` (DESIGN.md section 3): 'tp' -> the replica (tp*cp ranks, Helix's
CP->TP repurposing); 'sp' -> the tp group (each CP rank runs its own token chunk);
'world_tp' -> all dp*tp*cp ranks (the tokens of every replica are gathered before the FFN).
The vocab (token embedding rows, LM head output features) is split over the replica whatever
`ffn` is, since the embedding and the LM head see the replica's own tokens; a vocab not
divisible by tp*cp is padded with zero rows that the LM head's gather drops. MoE experts use
the FFN group too, except under 'world_tp', where they stay on the replica (the routed grouped
matmuls are not token-wise, so the replicas' tokens are not gathered for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cpcompile.options import COMBINES, FFNS, MOES
from cpcompile.passes.find_attention import AttentionSite
from cpcompile.passes.find_projections import Projection, Roles

# role -> (kind, group); "ffn" / "moe" stand for the FFN / MoE group of the mesh (below)
_PLACEMENT = {
    "q": ("column", "tp"), "k": ("column", "tp"), "v": ("column", "tp"),
    "qkv": ("packed-column", "tp"), "kv": ("packed-column", "tp"), "qk": ("packed-column", "tp"), "qv": ("packed-column", "tp"),
    "o": ("row", "replica"),
    "gate": ("column", "ffn"), "up": ("column", "ffn"), "fc1": ("column", "ffn"), "gate_up": ("packed-column", "ffn"),
    "down": ("row", "ffn"), "fc2": ("row", "ffn"),
    "embedding": ("vocab", "replica"), "lm_head": ("vocab", "replica"),
    "expert_up": ("expert-column", "moe"), "expert_down": ("expert-row", "moe"),
    "shared_gate": ("column", "moe"), "shared_up": ("column", "moe"), "shared_down": ("row", "moe"),
}
# the projections that read the attention's input: they need every token of the replica (tokenwise.py)
ATTENTION_INPUT_ROLES = ("q", "k", "v", "qkv", "kv", "qk", "qv", "q_down", "kv_down", "mla_q")
EXPERT_ROLES = ("expert_up", "expert_down")
_MOE_GROUP = {"tp": "replica", "sp": "tp", "world_tp": "replica"}
VOCAB_ROLES = ("embedding", "lm_head")
FFN_COLUMN_ROLES = ("gate", "up", "fc1", "gate_up")
FFN_ROW_ROLES = ("down", "fc2")
FFN_ROLES = FFN_COLUMN_ROLES + FFN_ROW_ROLES
SHARED_EXPERT_ROLES = ("shared_gate", "shared_up", "shared_down")  # a MoE block's dense expert: the MoE group
_FFN_GROUP = {"tp": "replica", "sp": "tp", "world_tp": "world"}
KINDS = ("replicate", "column", "packed-column", "row", "vocab", "expert-column", "expert-row", "expert")


class MeshError(ValueError):
    """A mesh this model cannot take; the message lists the ones it can."""


@dataclass(frozen=True)
class Mesh:
    tp: int = 1
    cp: int = 1
    dp: int = 1
    combine: str = "all_to_all"
    ffn: str = "tp"
    vocab: str = "parallel"
    moe: str = "tp"

    @property
    def replica(self) -> int:
        return self.tp * self.cp

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.cp

    def size(self, group: str) -> int:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "replica": self.replica, "world": self.world}[group]


@dataclass(frozen=True)
class Placement:
    """How one projection's weight is split under the mesh: the plan's row for it."""

    weight: str
    role: str
    layer: int
    kind: str  # one of KINDS; "packed-column": several column blocks in one weight (qkv, gate_up)
    group: str | None  # the group it is split over ("tp" | "replica" | "world"); None when replicated
    shape: tuple[int, int]  # [out, in]
    projection: Projection = field(compare=False, repr=False)  # what find_projections found (node, sizes)

    @property
    def sharded(self) -> bool:
        return self.kind != "replicate"

    def __str__(self) -> str:
        """'column/tp', 'row/replica', 'replicate': the form explain prints."""
        return self.kind if self.group is None else f"{self.kind}/{self.group}"


def _place(role: str, mesh: Mesh) -> tuple[str, str | None]:
    """(kind, group) of a projection with `role` under `mesh`; ("replicate", None) where its group has one rank."""
    kind, group = _PLACEMENT.get(role, ("replicate", None))
    if role in VOCAB_ROLES and mesh.vocab != "parallel":
        return "replicate", None
    if role == "o" and mesh.combine == "all_gather":
        group = "tp"
    if role in EXPERT_ROLES and mesh.moe == "ep":
        kind = "expert"
    group = {"ffn": _FFN_GROUP.get(mesh.ffn, "replica"), "moe": _MOE_GROUP.get(mesh.ffn, "replica")}.get(group, group)
    if kind == "replicate" or mesh.size(group) == 1:
        return "replicate", None
    return kind, group


def placements(roles: Roles, mesh: Mesh) -> list[Placement]:
    """Every projection's placement under `mesh`, in `roles.projections` order, not validated (see `plan`)."""
    return [Placement(p.weight, p.role, p.layer, *_place(p.role, mesh), (p.out_features, p.in_features), p)
            for p in roles.projections]


def plan(roles: Roles, sites: list[AttentionSite], mesh: Mesh) -> list[Placement]:
    validate_mesh(roles, sites, mesh)
    return placements(roles, mesh)


def plan_problems(roles: Roles, sites: list[AttentionSite], mesh: Mesh) -> list[str]:
    """Why this model cannot run on `mesh`, one line each (sorted); empty when it can."""
    out = []
    if mesh.combine not in COMBINES:
        out.append(f"combine={mesh.combine!r} is not one of {COMBINES}")
    if mesh.ffn not in FFNS:
        out.append(f"ffn={mesh.ffn!r} is not one of {FFNS}")
    if mesh.moe not in MOES:
        out.append(f"moe={mesh.moe!r} is not one of {MOES}")
    for name, n in (("tp", mesh.tp), ("cp", mesh.cp), ("dp", mesh.dp)):
        if n < 1:
            out.append(f"{name}={n} must be >= 1")
    if out:
        return out
    for s in sites:
        d = s.dims
        if d["Hq"] % mesh.tp:
            out.append(f"layer {s.index}: Hq={d['Hq']} query heads are not divisible by tp={mesh.tp}")
        if mesh.tp > d["Hkv"] and mesh.tp % d["Hkv"]:
            out.append(f"layer {s.index}: tp={mesh.tp} > Hkv={d['Hkv']} KV heads and Hkv does not divide tp")
        if mesh.tp <= d["Hkv"] and d["Hkv"] % mesh.tp:
            out.append(f"layer {s.index}: Hkv={d['Hkv']} KV heads are not divisible by tp={mesh.tp}")
        if mesh.combine in ("all_to_all", "ag_rs") and (d["Hq"] // mesh.tp) % mesh.cp:
            # both hand each CP rank 1/cp of this TP rank's heads (all-to-all / reduce-scatter over heads)
            out.append(
                f"layer {s.index}: combine={mesh.combine!r} needs Hq/tp={d['Hq'] // max(mesh.tp, 1)} divisible by "
                f"cp={mesh.cp} (use 'all_gather')"
            )
    if mesh.replica > 1:
        out += [f"layer {m}" for m in missing_roles(roles, sites)]
        up = {p.layer for p in roles.projections if p.role == "kv_up"}
        out += [f"layer {s.index}: its K/V are up-projected from the cache (kv_up) in a form absorb_latent does not read, "
                "so its heads cannot be sharded; it runs at tp = cp = 1 only" for s in sites if s.index in up and s.latent is None]
    for pl in placements(roles, mesh):
        p = pl.projection
        if not pl.sharded:
            continue
        group = mesh.size(pl.group)
        if pl.kind == "vocab":
            continue  # a vocab not divisible by the group is padded (shard_weights.vocab_shard)
        if pl.kind == "expert":
            if p.experts % group:
                out.append(f"{p.weight} ({p.role}): {p.experts} experts not divisible by {group} ({pl}, moe='ep'); use moe='tp'")
            continue
        if pl.kind == "expert-column":
            continue  # its columns follow expert_down's input chunk (checked there)
        dim = p.in_features if pl.kind in ("row", "expert-row") else p.out_features
        if pl.kind == "packed-column":
            dim //= 2 if p.role in ("gate_up", "kv", "qk", "qv") else 1
        if dim % group:
            out.append(f"{p.weight} ({p.role}): {'in' if pl.kind == 'row' else 'out'} features {dim} not divisible by {group} ({pl})")
    return sorted(set(out))


_NEEDS = {"q": ("q", "qkv", "qk", "qv", "mla_q"), "k": ("k", "qkv", "qk", "kv", "kv_down"), "v": ("v", "qkv", "qv", "kv", "kv_down"), "o": ("o",)}


def missing_roles(roles: Roles, sites: list[AttentionSite]) -> list[str]:
    """One line per attention site lacking a q, k, v (or fused) or o projection: such a layer's heads
    cannot be sharded (its attention would read heads no projection made local, or its output would
    reach the residual stream unreduced), so any mesh with tp or cp > 1 is refused."""
    out = []
    for s in sites:
        have = {p.role for p in roles.by_layer(s.index)}
        missing = [r for r, forms in _NEEDS.items() if not have & set(forms)]
        if missing:
            out.append(
                f"{s.index}: no {'/'.join(missing)} projection found by dataflow around its attention (roles found: "
                f"{sorted(have) or 'none'}); it cannot be sharded, so this model runs at tp = cp = 1 only "
                "(see cpcompile.explain's 'not understood')"
            )
    return out


def valid_meshes(
    roles: Roles, sites: list[AttentionSite], max_world: int = 16, combine: str = "all_to_all", dp: int = 1, ffn: str = "tp",
    moe: str = "tp",
) -> list[tuple[int, int]]:
    """The (tp, cp) this model can take at `dp` replicas, up to `max_world` ranks in all."""
    return [
        (tp, cp)
        for tp in range(1, max_world // dp + 1)
        for cp in range(1, max_world // (dp * tp) + 1)
        if not plan_problems(roles, sites, Mesh(tp, cp, dp, combine, ffn, moe=moe))
    ]


def validate_mesh(roles: Roles, sites: list[AttentionSite], mesh: Mesh) -> None:
    problems = plan_problems(roles, sites, mesh)
    if problems:
        combine = mesh.combine if mesh.combine in COMBINES else "all_to_all"
        ffn = mesh.ffn if mesh.ffn in FFNS else "tp"
        dp = max(mesh.dp, 1)
        moe = mesh.moe if mesh.moe in MOES else "tp"
        valid = valid_meshes(roles, sites, max(16, mesh.world), combine, dp, ffn, moe)
        at = f", dp={dp}, ffn={ffn!r}" if (dp, ffn) != (1, "tp") else ""
        at += f", moe={moe!r}" if moe != "tp" else ""
        raise MeshError(
            f"this model cannot run at dp={mesh.dp}, tp={mesh.tp}, cp={mesh.cp}, combine={mesh.combine!r}, "
            f"ffn={mesh.ffn!r}:\n  - "
            + "\n  - ".join(problems)
            + f"\nValid (tp, cp) for this model with combine={combine!r}{at}: {valid}"
        )


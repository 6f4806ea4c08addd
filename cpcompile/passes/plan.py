"""Pass 2 — plan: role -> placement under the mesh, validated with actionable errors.

The plan is data (one table, as gpt-fast's `tp.py`): each role maps to how its weight is
split and over which group (`DESIGN.md` sections 1-3). Validation names the numbers and lists
the meshes this model can take.

| role                     | placement (combine all_to_all / ag_rs)  | all_gather combine |
|--------------------------|-----------------------------------------|--------------------|
| q, k, v, kv_up (MLA)     | column over tp, by heads                | same               |
| qkv, kv (fused)          | packed column over tp, by heads         | same               |
| o                        | row over the replica (tp*cp ranks)      | row over tp        |
| gate, up, fc1            | column over the replica                 | same               |
| gate_up                  | packed column over the replica          | same               |
| down, fc2                | row over the replica (+ all-reduce)     | same               |
| q_down, kv_down (latents)| replicate                               | same               |
| ffn_other, lm_head, other|                                         |                    |
"""

from __future__ import annotations

from dataclasses import dataclass

from cpcompile.options import COMBINES
from cpcompile.passes.find_attention import AttentionSite
from cpcompile.passes.find_projections import Roles

_PLACEMENT = {
    "q": "column/tp", "k": "column/tp", "v": "column/tp", "qkv": "packed-column/tp", "kv": "packed-column/tp",
    "qk": "packed-column/tp", "qv": "packed-column/tp", "kv_up": "column/tp",
    "o": "row/replica",
    "gate": "column/replica", "up": "column/replica", "fc1": "column/replica", "gate_up": "packed-column/replica",
    "down": "row/replica", "fc2": "row/replica",
}


class MeshError(ValueError):
    """A mesh this model cannot take; the message lists the ones it can."""


@dataclass(frozen=True)
class Mesh:
    tp: int = 1
    cp: int = 1
    dp: int = 1
    combine: str = "all_to_all"

    @property
    def replica(self) -> int:
        return self.tp * self.cp


@dataclass
class Placement:
    weight: str
    role: str
    layer: int
    placement: str  # "replicate" | "column/tp" | "row/replica" | ...
    shape: tuple[int, int]


def placement_for(role: str, mesh: Mesh) -> str:
    p = _PLACEMENT.get(role, "replicate")
    if role == "o" and mesh.combine == "all_gather":
        p = "row/tp"
    group = p.split("/")[-1]
    size = {"tp": mesh.tp, "replica": mesh.replica}.get(group, 1)
    return "replicate" if size == 1 else p


def plan(roles: Roles, sites: list[AttentionSite], mesh: Mesh) -> list[Placement]:
    validate_mesh(roles, sites, mesh)
    return [
        Placement(p.weight, p.role, p.layer, placement_for(p.role, mesh), (p.out_features, p.in_features))
        for p in roles.projections
    ]


def _problems(roles: Roles, sites: list[AttentionSite], mesh: Mesh) -> list[str]:
    out = []
    if mesh.combine not in COMBINES:
        out.append(f"combine={mesh.combine!r} is not one of {COMBINES}")
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
    mla = sorted({p.layer for p in roles.projections if p.role == "kv_up"})
    if mla and mesh.replica > 1:
        out.append(
            f"layers {mla}: MLA attention (K/V up-projected from cached latents, DeepSeek-V2/V3) runs at "
            "tp = cp = 1 only in this version"
        )
    for p in roles.projections:
        pl = placement_for(p.role, mesh)
        if pl == "replicate":
            continue
        group = mesh.tp if pl.endswith("/tp") else mesh.replica
        dim = p.in_features if pl.startswith("row") else p.out_features
        if pl.startswith("packed"):
            dim //= 2 if p.role in ("gate_up", "kv", "qk", "qv") else 1
        if dim % group:
            out.append(f"{p.weight} ({p.role}): {'in' if pl.startswith('row') else 'out'} features {dim} not divisible by {group} ({pl})")
    return sorted(set(out))


def valid_meshes(roles: Roles, sites: list[AttentionSite], max_world: int = 16, combine: str = "all_to_all") -> list[tuple[int, int]]:
    return [
        (tp, cp)
        for tp in range(1, max_world + 1)
        for cp in range(1, max_world // tp + 1)
        if not _problems(roles, sites, Mesh(tp, cp, 1, combine))
    ]


def validate_mesh(roles: Roles, sites: list[AttentionSite], mesh: Mesh) -> None:
    problems = _problems(roles, sites, mesh)
    if problems:
        valid = valid_meshes(roles, sites, max(16, mesh.tp * mesh.cp), mesh.combine if mesh.combine in COMBINES else "all_to_all")
        raise MeshError(
            f"this model cannot run at tp={mesh.tp}, cp={mesh.cp}, combine={mesh.combine!r}:\n  - "
            + "\n  - ".join(problems)
            + f"\nValid (tp, cp) for this model with combine={mesh.combine!r}: {valid}"
        )

"""`cpcompile.explain(model, tp=, cp=)`: what the passes found and what they would do, at a glance.

    print(cpcompile.explain(model, tp=2, cp=2))

For each layer: the attention found (form, heads, head dims, mask/causal/softcap, cache),
each projection with its role and planned placement under the mesh; then anything the
passes did not understand, whether the mesh fits (and if not, why and which ones do).
An attention cpcompile cannot rewrite raises `AttentionError` here, as it would at compile time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpcompile.options import Options
from cpcompile.passes import Analysis
from cpcompile.passes.plan import Mesh, _problems, placement_for, valid_meshes


@dataclass
class Explanation:
    model: str
    mesh: Mesh
    kv_interleave: int
    analysis: Analysis
    problems: list[str]
    valid: list[tuple[int, int]]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        m = self.mesh
        lines = [
            f"cpcompile.explain: {self.model} at tp={m.tp}, cp={m.cp}, dp={m.dp} "
            f"(combine={m.combine}, kv_interleave={self.kv_interleave})"
        ]
        projections = self.analysis.roles.projections
        width = max((len(p.weight) for p in projections), default=10)
        for site in self.analysis.sites:
            lines.append(f"layer {site.index}: {site.describe()}")
            for p in (p for p in projections if p.layer == site.index):
                shape = f"[{p.out_features}, {p.in_features}]"
                lines.append(f"    {p.role:<9} {p.weight:<{width}} {shape:<12} {placement_for(p.role, m)}")
        for p in (p for p in projections if p.layer < 0):
            lines.append(f"outside layers: {p.role} {p.weight} [{p.out_features}, {p.in_features}] {placement_for(p.role, m)}")
        lines.append("not understood: " + ("nothing" if not self.analysis.notes else ""))
        lines += [f"    {n}" for n in self.analysis.notes]
        if self.problems:
            lines.append("mesh does NOT fit:")
            lines += [f"    - {p}" for p in self.problems]
        else:
            lines.append("mesh fits")
        lines.append(f"valid (tp, cp) with combine={m.combine}: {self.valid}")
        return "\n".join(lines)


def explain(
    model: torch.nn.Module, *, tp: int = 1, cp: int = 1, dp: int = 1, combine: str = "all_to_all", kv_interleave: int = 1
) -> Explanation:
    from cpcompile.parallelize import capture

    if getattr(model, "_cpcompile", None) is not None:
        raise ValueError(
            "explain: this model is already parallelized (its sharded weights are stand-ins); call "
            "cpcompile.explain on the model before cpcompile.parallelize"
        )
    mesh = Mesh(tp, cp, dp, combine)
    analysis = capture(model, Options())  # analysed at tp = cp = 1: explain reports mesh problems, never raises on them
    problems = _problems(analysis.roles, analysis.sites, mesh)
    valid = valid_meshes(analysis.roles, analysis.sites, 16, combine if combine in ("all_to_all", "ag_rs", "all_gather") else "all_to_all")
    return Explanation(type(model).__name__, mesh, kv_interleave, analysis, problems, valid)

"""The rank layout and process groups (DESIGN.md section 1).

world = dp x tp x cp, CP innermost: rank = (dp_rank * tp + tp_rank) * cp + cp_rank.

| group   | members                         | used for                                   |
|---------|---------------------------------|--------------------------------------------|
| cp      | same dp_rank, tp_rank           | combining partial attention (every layer)  |
| tp      | same dp_rank, cp_rank           | head sharding of attention                 |
| replica | the tp*cp ranks of one replica  | o_proj / FFN row-parallel all-reduce       |
| dp      | same tp_rank, cp_rank           | splitting the batch, gathering results     |
| world   | every rank                      | the FFN under ffn='world_tp'               |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from cpcompile.passes.plan import Mesh


@dataclass(frozen=True)
class RankContext(Mesh):
    """One rank: the mesh it is part of (`Mesh`: tp, cp, dp, combine, ffn, vocab, moe), its place
    in it, and the groups its collectives run over. Made once at `parallelize` (`rank_context`) and
    read by every pass; `cpcompile.explain` makes one with stand-in group names."""

    rank: int = 0  # global rank, `(dp_rank * tp + tp_rank) * cp + cp_rank`
    kv_interleave: int = 1  # KV slots per run on one CP rank (DESIGN.md section 2)
    mla_uv: str = "after"  # MLA: W_UV after the combine (this rank's heads) or before it (all heads)
    group_names: dict = field(default_factory=dict, hash=False)  # group -> functional-collective group name
    handles: dict = field(default_factory=dict, hash=False, compare=False, repr=False)  # group -> ProcessGroup

    @property
    def mesh(self) -> Mesh:
        """The mesh alone (what the plan is made for)."""
        return Mesh(*(getattr(self, f.name) for f in fields(Mesh)))

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def tp_rank(self) -> int:
        return (self.rank // self.cp) % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.cp * self.tp)

    def ranks(self, group: str) -> list[int]:
        """Global ranks of this rank's `group` ('cp' | 'tp' | 'replica' | 'dp' | 'world'), in group-rank order."""
        base = lambda d, t, c: (d * self.tp + t) * self.cp + c
        d, t, c = self.dp_rank, self.tp_rank, self.cp_rank
        if group == "cp":
            return [base(d, t, i) for i in range(self.cp)]
        if group == "tp":
            return [base(d, i, c) for i in range(self.tp)]
        if group == "replica":
            return [base(d, i, j) for i in range(self.tp) for j in range(self.cp)]
        if group == "dp":
            return [base(i, t, c) for i in range(self.dp)]
        if group == "world":
            return list(range(self.dp * self.tp * self.cp))
        raise ValueError(f"unknown group {group!r}")

    def group_rank(self, group: str) -> int:
        """This rank's index in `group` (the order `ranks` lists it)."""
        return self.ranks(group).index(self.rank)

    def name(self, group: str) -> str:
        """`group`'s name, as functional collectives take it."""
        return self.group_names[group]

    @classmethod
    def of(cls, options, rank: int = 0, group_names: dict | None = None, handles: dict | None = None) -> "RankContext":
        """The context of global `rank` under `options` (cpcompile.options.Options)."""
        o = options
        return cls(o.tp, o.cp, o.dp, o.combine, o.ffn, o.vocab, o.moe, rank, o.kv_interleave, o.mla_uv,
                   dict(group_names or {}), dict(handles or {}))


# Subgroups already made in this process, by (default group, ranks): every `parallelize` in one
# process (a server loading several models, the test suite's persistent worlds) would otherwise
# make new communicators each time and never free them; each holds gloo's polling threads.
_SUBGROUPS: dict[tuple, object] = {}


def _subgroup(ranks: tuple[int, ...]):
    """`dist.new_group(ranks)`, made once per default process group (all ranks call it in the same
    order, so all of them hit or miss together, as `new_group` requires)."""
    world = dist.group.WORLD
    key = (id(world), ranks)  # the entry holds `world`, so its id cannot be reused while cached
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = (world, dist.new_group(list(ranks)))
    return _SUBGROUPS[key][1]


def rank_context(options, device: torch.device) -> RankContext:
    """Initialise the default group if needed (torchrun's env vars), build this rank's groups and
    return its context (`options`: cpcompile.options.Options).

    Every rank creates every subgroup in the same order, as `dist.new_group` requires.
    """
    tp, cp, dp = options.tp, options.cp, options.dp
    world = tp * cp * dp
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                f"cpcompile: tp={tp}, cp={cp}, dp={dp} needs {world} ranks, but no process group is initialised and "
                "no torchrun environment is set. Launch with `torchrun --nproc-per-node "
                f"{world} ...` or `python -m cpcompile generate`, or call torch.distributed.init_process_group first."
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world:
        raise ValueError(
            f"cpcompile: the process group has {dist.get_world_size()} ranks but dp*tp*cp = {dp}*{tp}*{cp} = {world}; "
            "they must be equal"
        )
    me = dist.get_rank()
    handles = {}
    for kind in ("cp", "tp", "replica", "dp"):
        mine = None
        seen = set()
        for r in range(world):  # enumerate every group of this kind, identically on all ranks
            ranks = tuple(RankContext(tp, cp, dp, rank=r).ranks(kind))
            if ranks in seen:
                continue
            seen.add(ranks)
            g = _subgroup(ranks)
            if me in ranks:
                mine = g
        handles[kind] = mine
    handles["world"] = dist.group.WORLD
    return RankContext.of(options, me, {k: h.group_name for k, h in handles.items()}, handles)

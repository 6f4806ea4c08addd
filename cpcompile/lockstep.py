"""Keeping the ranks in lockstep: the same inputs on the ranks that must see them, the same
generation settings, and (local requests under ffn='world_tp') every replica stepping until all
are done.

  * `check_same_inputs`: a cheap checksum all-reduced over the ranks that must see the same
    inputs (all ranks, or a replica's with dp_inputs='local'), before every forward.
  * `lockstep_generate`: `generate` that first agrees on the settings
    (`data_parallel.agree_on_settings`).
"""

from __future__ import annotations

import functools

import torch

from cpcompile.data_parallel import agree_on_settings


def lockstep_generate(model, state, generate):
    """`generate` that first checks every rank runs it with the same settings and, where replicas
    exchange data every step but may stop at different steps (local requests under
    ffn='world_tp'), keeps the finished ones stepping (HF's synced_gpus) until all are done."""

    @functools.wraps(generate)
    def lockstep(*args, **kwargs):
        agree_on_settings(model, kwargs)
        o = state.options
        if o.dp > 1 and o.dp_inputs == "local" and o.ffn == "world_tp":
            kwargs.setdefault("synced_gpus", True)
        return generate(*args, **kwargs)

    return lockstep


def check_same_inputs(ids: torch.Tensor, group) -> None:
    """Every rank of `group` (None: all) must be given the same inputs; a cheap checksum catches one that is not."""
    import torch.distributed as dist

    flat = ids.reshape(-1).double()
    c = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)).sum(),
                     torch.tensor(float(ids.shape[0]), device=flat.device), torch.tensor(float(ids.shape[1]), device=flat.device)])
    both = torch.cat([c, -c])  # one all-reduce gives the max and (negated) min of every field
    dist.all_reduce(both, dist.ReduceOp.MAX, group=group)
    hi, lo = both[:4], -both[4:]
    if not torch.equal(hi, lo):
        who = "every rank" if group is None else "every rank of a replica (its tp*cp ranks)"
        raise ValueError(
            f"cpcompile: rank {dist.get_rank()} sees inputs that differ from other ranks (checksum {c.tolist()} vs "
            f"min {lo.tolist()} / max {hi.tolist()}); {who} must pass the same input_ids"
        )

"""Keeping the ranks in lockstep: the same inputs on the ranks that must see them, the same
generation settings, the same samples, and (local requests under ffn='world_tp') every replica
stepping until all are done (docs/distributed.md, "Sampling and the inputs checksum").

  * `check_same_inputs`: a cheap checksum all-reduced over the ranks that must see the same
    inputs (all ranks, or a replica's with dp_inputs='local'), before every forward. A mismatch
    raises `InputsDiffer`, which names the caller's input_ids.
  * `lockstep_generate`: `generate` that first agrees on the settings
    (`data_parallel.agree_on_settings`) and on the sampling RNG state (`share_rng_state`), and
    that reports a mismatch at a token the ranks generated themselves as `RanksDiverged`: their
    own outputs differed, a cpcompile error, not the caller's.

Why the ranks sample the same tokens: every rank of a group ends a forward with the same logits,
bit for bit (the final hidden state is all-reduced or all-gathered, the LM head's vocab shards
are all-gathered, and under dp='global' the replicas' rows are all-gathered too: each rank
holds copies, not recomputations). HF samples with `torch.multinomial` on the logits' device
and its default generator, so identical generator states give identical tokens. The first rank
of the group broadcasts its states at the start of `generate()`; rank 0's is then the stream a
single device would use, so `torch.manual_seed(s)` on every rank (or on rank 0 alone) gives the
single-device model's samples under the same seed. The alternative, broadcasting rank 0's
sampled token each step, would add one collective per decode step and need a hook inside HF's
sampling loop; one broadcast per `generate()` needs neither.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from cpcompile.data_parallel import agree_on_settings


class InputsDiffer(ValueError):
    """The ranks that must see the same inputs were given different ones; `position` is the number
    of tokens the KV cache held before the call (0 for a prompt into a fresh cache)."""

    def __init__(self, message: str, position: int):
        super().__init__(message)
        self.position = position


class RanksDiverged(RuntimeError):
    """Inside `generate()`, the ranks fed back different tokens they generated themselves."""


def agreeing_group(state):
    """`(group, src)`: the ranks that must run the same requests (None: all ranks) and the global
    rank of the first of them; None where this rank agrees only with itself (dp_inputs='local',
    tp = cp = 1)."""
    o = state.options
    if o.dp == 1 or o.dp_inputs == "global":
        return None, 0
    if o.tp * o.cp > 1:
        return state.ctx.handles["replica"], state.ctx.ranks("replica")[0]
    return None


def share_rng_state(group, src: int, device: torch.device) -> None:
    """Every rank of `group` takes global rank `src`'s RNG state: the CPU generator and, for a model
    on an accelerator, that device's default generator (where `torch.multinomial` draws). One
    broadcast of ~5 KB; on the model's device, as NCCL requires."""
    states = [torch.get_rng_state()]
    accel = torch.get_device_module(device.type) if device.type != "cpu" else None
    if accel is not None:
        states.append(accel.get_rng_state(device))
    sizes = [s.numel() for s in states]
    buf = torch.cat(states).to(device)  # uint8
    dist.broadcast(buf, src=src, group=group)
    cpu_state, dev_state = (list(buf.cpu().split(sizes)) + [None])[:2]
    torch.set_rng_state(cpu_state)
    if accel is not None:
        accel.set_rng_state(dev_state, device)


def lockstep_generate(model, state, generate):
    """`generate` that keeps the ranks in lockstep:

      * every rank runs it with the same settings (`agree_on_settings`);
      * the ranks that must agree (`agreeing_group`) take the first one's RNG state, so they
        sample the same tokens; afterwards each continues from where that shared stream ends
        (the state a single device would have), with dp_inputs='local' each replica its own;
      * a checksum mismatch at a token the ranks generated (at or past the prompt's length)
        raises `RanksDiverged`, as does a difference in the returned sequences;
      * where replicas exchange data every step but may stop at different steps (local requests
        under ffn='world_tp'), the finished ones keep stepping (HF's synced_gpus) until all are done.
    """

    @functools.wraps(generate)
    def lockstep(*args, **kwargs):
        agree_on_settings(model, kwargs)
        o = state.options
        if o.dp > 1 and o.dp_inputs == "local" and o.ffn == "world_tp":
            kwargs.setdefault("synced_gpus", True)
        agreeing = agreeing_group(state)
        if agreeing is not None:
            share_rng_state(*agreeing, state.engine.device)
        prompt = _prompt_length(args, kwargs)
        try:
            out = generate(*args, **kwargs)
        except InputsDiffer as e:
            if e.position < max(prompt, 1):  # the caller's prompt (or a cache it passed): its own inputs
                raise
            raise RanksDiverged(_diverged(e.position - prompt + 1, f"the token fed back at position {e.position}")) from e
        sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        if agreeing is not None and isinstance(sequences, torch.Tensor):
            try:
                check_same_inputs(sequences, agreeing[0], position=-1)
            except InputsDiffer as e:
                raise RanksDiverged(_diverged("the last", "the sequences generate() returns")) from e
        return out

    return lockstep


def _prompt_length(args, kwargs) -> int:
    """Tokens of the prompt `generate()` was given (input_ids or inputs_embeds, dim 1); 0 if none."""
    for x in (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return x.shape[1]
    return 0


def _diverged(step, where: str) -> str:
    return (
        f"cpcompile: rank {dist.get_rank()}: the ranks' own outputs diverged at decode step {step} of generate(): "
        f"{where} differs between ranks that were given the same prompt, settings and sampling state. They generated "
        "different tokens from their logits, so the parallel model's outputs differ between ranks: a cpcompile "
        "parallelization error, not a problem with your inputs. Please report it with the output of "
        "cpcompile.explain(model, tp=..., cp=..., dp=...) and the parallelize arguments. (A custom logits processor or "
        "stopping criterion that behaves differently on different ranks has the same effect.)"
    )


def check_same_inputs(ids: torch.Tensor, group, position: int = 0, logits_to_keep: int = 0) -> None:
    """Every rank of `group` (None: all) must be given the same inputs; a cheap checksum catches one
    that is not (`InputsDiffer`, carrying `position`: the tokens in the cache before this call).
    `logits_to_keep` is checked too: it picks the graph (all logits or the last token's), and ranks
    running different graphs would issue mismatched collectives (the vocab-parallel LM head's
    all-gather) and hang or abort instead of raising."""
    flat = ids.reshape(-1).double()
    dev = flat.device
    c = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=dev)).sum(),
                     torch.tensor(float(ids.shape[0]), device=dev), torch.tensor(float(ids.shape[1]), device=dev),
                     torch.tensor(float(logits_to_keep), device=dev)])
    n = c.numel()
    both = torch.cat([c, -c])  # one all-reduce gives the max and (negated) min of every field
    dist.all_reduce(both, dist.ReduceOp.MAX, group=group)
    hi, lo = both[:n], -both[n:]
    if torch.equal(hi[:4], lo[:4]) and not torch.equal(hi, lo):
        raise InputsDiffer(
            f"cpcompile: rank {dist.get_rank()} is called with logits_to_keep={logits_to_keep}, other ranks with "
            f"{sorted({int(lo[4]), int(hi[4])})}; every rank must call the model the same way (a wrapper around "
            "model.forward that hides its signature changes what generate() passes)",
            position,
        )
    if not torch.equal(hi, lo):
        who = "every rank" if group is None else "every rank of a replica (its tp*cp ranks)"
        raise InputsDiffer(
            f"cpcompile: rank {dist.get_rank()} sees inputs that differ from other ranks (checksum {c.tolist()} vs "
            f"min {lo.tolist()} / max {hi.tolist()}); {who} must pass the same input_ids",
            position,
        )

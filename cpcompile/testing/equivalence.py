"""`assert_equivalent`: check that a parallelized model computes what the single-device model does.

    import functools
    from cpcompile.testing import assert_equivalent
    from cpcompile.tiny import tiny_model

    assert_equivalent(functools.partial(tiny_model, "llama", seed=3), tp=2, cp=2,
                      prompts=[[5, 6, 7, 8], [9, 10]], max_new_tokens=8, combine="ag_rs")

What runs (DESIGN.md section 7's equivalence, made checkable on any model):

  1. the reference: `model_factory()` on this process, one device, HF's own attention and the
     cache the model makes itself (a `transformers.DynamicCache`, or its own class), greedy decoding for `max_new_tokens` steps;
  2. the parallel run: `model_factory()` on each of the dp*tp*cp ranks of a `World`, then
     `cpcompile.parallelize(model, tp=, cp=, dp=, **parallel_options)`, driven with **forced
     decoding**: at every step it is fed the *reference's* token, so that after a near-tie
     (the two runs legitimately picking different tokens) the later steps still compare the
     same sequences.

With dp > 1 the batch's rows are split over the replicas as `parallelize` splits them
(`cpcompile.data_parallel.split_rows`: the first B % dp replicas one row more; B >= dp).
dp_inputs='global': every rank is given the whole batch and returns the whole batch's logits.
dp_inputs='local': each replica is given only its rows, left-padded to *its own* width, and
returns only theirs; the reference still runs the whole batch on one device. Rows are compared
step by step (the last position's logits of step t), never by absolute column, so a replica's
narrower padding does not matter.

Both runs are driven by the same step loop (`_drive`): step 0 is the prefill of the
left-padded batch, step t > 0 feeds one token per row; `position_ids` are computed as HF's
`generate` does (`attention_mask.cumsum(-1) - 1`, padding clamped to 0) and passed to both,
and the 2D attention mask grows by one column per step.

Per step and batch row, the last position's logits are compared (in fp32):
  * logits: `|parallel - reference| <= atol + rtol * |reference|` elementwise, `Tolerance` per dtype;
  * tokens: the parallel argmax may differ from the reference's only at a near-tie, i.e. when
    the reference's top-2 logits are within `near_tie`;
  * ranks: every rank's logits must equal rank 0's within `atol` (with dp_inputs='local', its
    replica's first rank's: replicas hold different rows); they are normally bitwise equal (the
    final hidden state is all-reduced, and the vocab-parallel LM head's logits all-gathered, or
    the LM head replicated with vocab='replicate'); the result says whether they were.
The first failing (step, row) raises an `AssertionError` with the errors, the mesh and a
snippet that reproduces the case.
"""

from __future__ import annotations

import functools
import inspect
import pickle
from dataclasses import dataclass, field

import torch
from cpcompile._hf import output_cache, cache_arg

# Tolerances, per dtype, for logits of O(10) (cpcompile.tiny's init; real checkpoints are
# similar). The parallel run sums in another order (all-reduce over the replica, LSE merge
# of the CP partial attentions), so results agree to rounding, not bitwise.


@dataclass(frozen=True)
class Tolerance:
    atol: float
    """Absolute logit error allowed (elementwise, plus `rtol * |reference logit|`)."""
    rtol: float
    """Relative logit error allowed, elementwise."""
    near_tie: float
    """A greedy token may differ from the reference's only where the reference's top-2 logits
    are closer than this."""


FP32_TOLERANCE = Tolerance(atol=1e-4, rtol=0.0, near_tie=1e-3)
# bf16 keeps 8 significant bits: one rounding of a logit near 4 is 0.03, near 32 is 0.25, and
# every bf16 matmul / all-reduce in the two runs rounds in another order. Measured on the tiny
# models at tp=2, cp=2: up to 0.21 on logits of |4| (7 roundings). A bf16 check is therefore
# coarse; check exactness in fp32 (the default of the tiny models) and bf16 as a smoke test.
BF16_TOLERANCE = Tolerance(atol=0.5, rtol=0.02, near_tie=1.0)
TOLERANCES = {torch.float32: FP32_TOLERANCE, torch.bfloat16: BF16_TOLERANCE}

WORLD_TIMEOUT_S = 1800.0  # a real checkpoint on CPU ranks is slow; a hang is still reported


@dataclass
class NearTie:
    step: int
    row: int
    reference_token: int
    parallel_token: int
    gap: float  # reference's top-1 minus top-2 logit


@dataclass
class EquivalenceResult:
    """What `assert_equivalent` compared (returned when everything agreed)."""

    steps: int  # decode steps compared per row (step 0 = the prefill's last position)
    rows: int
    max_abs_error: float  # over all steps and rows, parallel (rank 0) vs reference
    max_rel_error: float  # max abs error / the row's largest |reference logit|, worst (step, row)
    near_ties: list[NearTie] = field(default_factory=list)  # steps whose tokens differed at a near-tie
    ranks_bitwise_equal: bool = True  # every rank's logits bitwise equal to rank 0's (local: its replica's first rank's)
    max_rank_error: float = 0.0  # largest |rank r - rank 0| logit difference (local: its replica's first rank)
    tolerance: Tolerance = FP32_TOLERANCE


# ----------------------------------------------------------------------------- inputs


def left_padded(prompts, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompts`: token lists (ragged; left-padded here) or `(input_ids, attention_mask)` tensors
    already left-padded. Returns `(ids [B, S] int64, mask [B, S] int64)`."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and all(isinstance(t, torch.Tensor) for t in prompts):
        ids, mask = prompts[0].long().cpu(), prompts[1].long().cpu()
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(f"assert_equivalent: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must both be [B, S]")
    else:
        rows = [list(map(int, p)) for p in prompts]
        if not rows:
            raise ValueError("assert_equivalent: prompts is empty; expected at least one prompt")
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"assert_equivalent: rows {(lengths == 0).nonzero().flatten().tolist()} have no tokens; every prompt needs at least one")
    left = torch.arange(mask.shape[1]) >= (mask.shape[1] - lengths)[:, None]  # [B, S]: where tokens should be
    if not torch.equal(mask.bool(), left):
        raise ValueError("assert_equivalent: attention_mask must be left padding (0...0 1...1 per row), as generate() uses")
    return ids, mask


def _drive(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, forced: torch.Tensor | None, cache):
    """Prefill then `steps - 1` one-token steps; returns (logits [steps, B, V] fp32, tokens [steps, B]).

    Step t feeds `forced[t - 1]` when given (forced decoding), else the argmax of step t - 1.
    `cache`: None lets the model make its own (HF's default for the reference, which may be a
    model's own class such as MiniMaxCache; cpcompile allocates its own)."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate: padding gets position 0
    all_logits, tokens = [], []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_arg(model): cache}, use_cache=True)
        for t in range(steps):
            logits = out.logits[:, -1].float()  # [B, V]
            all_logits.append(logits.cpu())
            tokens.append(logits.argmax(-1).cpu())
            if t == steps - 1:
                break
            nxt = (forced[t] if forced is not None else tokens[-1]).to(device)  # [B]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                        **{cache_arg(model): output_cache(out)}, use_cache=True)
    return torch.stack(all_logits), torch.stack(tokens)


def _build(model_factory, dtype):
    model = model_factory()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def run_reference(model_factory, dtype, ids, mask, steps):
    model = _build(model_factory, dtype)
    model_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    logits, tokens = _drive(model, ids, mask, steps, None, None)  # the cache the model makes itself, as generate()'s
    return logits, tokens, model_dtype


@dataclass(frozen=True)
class _Replicas:
    """The rows each replica runs and what it is given (one entry per replica)."""

    rows: list[range]  # global batch rows of each replica, in split_rows order
    inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (ids [b, s], mask [b, s], forced [steps, b]) given to each
    local: bool  # each replica returns its own rows (True) or the whole batch (False)


def split_replicas(ids, mask, forced, dp: int, dp_inputs: str) -> _Replicas:
    """Split the left-padded batch over `dp` replicas as `parallelize` does (`split_rows`; the
    caller checked B >= dp). Global: every replica is given the whole batch. Local: its own rows,
    cut to its own width (its widest prompt): the padding other replicas' prompts needed goes."""
    from cpcompile.data_parallel import split_rows

    counts = split_rows(ids.shape[0], dp)
    starts = [sum(counts[:d]) for d in range(dp)]
    rows = [range(a, a + c) for a, c in zip(starts, counts)]
    if dp_inputs != "local" or dp == 1:
        return _Replicas(rows, [(ids, mask, forced)] * dp, local=False)
    inputs = []
    for r in rows:
        sub = mask[r.start:r.stop]
        width = int(sub.sum(-1).max())
        inputs.append((ids[r.start:r.stop, -width:], sub[:, -width:], forced[:, r.start:r.stop]))
    return _Replicas(rows, inputs, local=True)


def _parallel_rank(model_factory, dtype, replicas: _Replicas, steps, options: dict):
    """On each rank (or in-process at dp = tp = cp = 1): build, parallelize, drive with forced tokens.

    Returns the whole batch's logits [steps, B, V] on rank 0 (None elsewhere), this rank's
    max |logits - those of the rank it is compared with| per (step, batch row) [steps, B], that
    rank ("against": rank 0, or with dp_inputs='local' the replica's first rank, since replicas
    return different rows), and whether the two were bitwise equal."""
    import torch.distributed as dist

    from cpcompile import parallelize

    # parallelize's own probe (verify=True) is a subset of this check; it stays off unless asked for
    model = parallelize(_build(model_factory, dtype), **{"verify": False, **options})
    replica_size = options["tp"] * options["cp"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    d = rank // replica_size  # this rank's replica
    ids, mask, forced = replicas.inputs[d]
    logits, _ = _drive(model, ids, mask, steps, forced, None)  # [steps, rows, V]
    if not dist.is_initialized():
        return dict(logits=logits, rank_error=torch.zeros(logits.shape[:2]), against=0, bitwise=True)
    if not replicas.local:
        first = logits.clone()
        dist.broadcast(first, src=0)
        return dict(logits=logits if rank == 0 else None, rank_error=(logits - first).abs().amax(-1), against=0,
                    bitwise=torch.equal(logits, first))
    # local: each replica's first rank broadcasts its rows; rank 0 assembles the batch from them
    every, rank_error, bitwise = [], torch.zeros(steps, replicas.rows[-1].stop), True
    for e, rows in enumerate(replicas.rows):
        first = logits.clone() if rank == e * replica_size else logits.new_empty(steps, len(rows), logits.shape[-1])
        dist.broadcast(first, src=e * replica_size)
        every.append(first)
        if e == d:
            rank_error[:, rows.start:rows.stop] = (logits - first).abs().amax(-1)
            bitwise = torch.equal(logits, first)
    return dict(logits=torch.cat(every, dim=1) if rank == 0 else None, rank_error=rank_error, against=d * replica_size,
                bitwise=bitwise)


# ----------------------------------------------------------------------------- comparison


@dataclass
class _Failure:
    step: int
    row: int
    what: str


def compare(ref_logits, ref_tokens, par_logits, rank_errors: list[tuple[int, int, torch.Tensor]], tol: Tolerance):
    """-> (EquivalenceResult, first _Failure or None). Logits [steps, B, V] fp32, tokens [steps, B];
    `rank_errors`: per rank, (rank, the rank it was compared with, max |difference| [steps, B])."""
    err = (par_logits - ref_logits).abs()  # [steps, B, V]
    bound = tol.atol + tol.rtol * ref_logits.abs()
    scale = ref_logits.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny)  # [steps, B]
    abs_err = err.amax(-1)  # [steps, B]
    rel_err = abs_err / scale
    top2 = ref_logits.topk(2, dim=-1).values if ref_logits.shape[-1] > 1 else torch.cat([ref_logits, ref_logits - float("inf")], -1)
    gap = top2[..., 0] - top2[..., 1]  # [steps, B]
    par_tokens = par_logits.argmax(-1)
    near_ties, failure = [], None
    steps, rows = ref_tokens.shape
    for t in range(steps):
        for b in range(rows):
            for r, first, re in rank_errors:
                if failure is None and re[t, b] > tol.atol:
                    failure = _Failure(t, b, f"rank {r} disagrees with rank {first}: its logits differ by up to {re[t, b]:.3g} > atol "
                                             f"{tol.atol:g} (every rank must compute the same logits for the rows it holds)")
            bad = err[t, b] > bound[t, b]
            if failure is None and bad.any():
                v = int(bad.nonzero()[0])
                failure = _Failure(t, b, f"logits differ beyond tolerance: max abs error {abs_err[t, b]:.3g}, max rel error "
                                         f"{rel_err[t, b]:.3g} (allowed: atol {tol.atol:g} + rtol {tol.rtol:g} x |reference|); "
                                         f"first bad vocab id {v}: parallel {par_logits[t, b, v]:.6g}, reference {ref_logits[t, b, v]:.6g}")
            if par_tokens[t, b] != ref_tokens[t, b]:
                if gap[t, b] < tol.near_tie:
                    near_ties.append(NearTie(t, b, int(ref_tokens[t, b]), int(par_tokens[t, b]), float(gap[t, b])))
                elif failure is None:
                    failure = _Failure(t, b, f"greedy tokens differ: reference {int(ref_tokens[t, b])}, parallel {int(par_tokens[t, b])}, "
                                             f"and the reference's top-2 gap {gap[t, b]:.3g} is no near-tie (< {tol.near_tie:g})")
    rank_max = max((float(re.max()) for _, _, re in rank_errors), default=0.0)
    result = EquivalenceResult(steps, rows, float(abs_err.max()), float(rel_err.max()), near_ties, True, rank_max, tol)
    return result, failure


# ----------------------------------------------------------------------------- reproduction snippet


def _source(obj, imports: set[str]) -> str:
    """Python source that rebuilds `obj` (a factory, its arguments); `imports` collects what it needs."""
    if isinstance(obj, functools.partial):
        imports.add("import functools")
        parts = [_source(obj.func, imports)] + [_source(a, imports) for a in obj.args]
        parts += [f"{k}={_source(v, imports)}" for k, v in obj.keywords.items()]
        return f"functools.partial({', '.join(parts)})"
    if isinstance(obj, torch.dtype):
        imports.add("import torch")
        return str(obj)
    if isinstance(obj, torch.Tensor):
        imports.add("import torch")
        return f"torch.tensor({obj.tolist()!r}, dtype={obj.dtype})"
    if isinstance(obj, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in obj):
        inner = ", ".join(_source(x, imports) for x in obj)
        return f"({inner},)" if isinstance(obj, tuple) else f"[{inner}]"
    try:
        from transformers import PretrainedConfig

        if isinstance(obj, PretrainedConfig):
            imports.add("import transformers")
            kwargs = {k: v for k, v in obj.to_diff_dict().items() if k not in ("transformers_version", "model_type")}
            return f"transformers.{type(obj).__name__}(**{kwargs!r})"
    except ImportError:  # pragma: no cover
        pass
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if callable(obj) and module and qualname and "<" not in qualname:
        top = qualname.split(".")[0]
        if module == "__main__":
            return f"{qualname}  # defined in your script"
        imports.add(f"from {module} import {top}")
        return qualname
    return repr(obj)


def reproduction(model_factory, *, tp, cp, dp, prompts, max_new_tokens, dtype, tolerance, parallel_options) -> str:
    """A standalone script calling `assert_equivalent` with these arguments."""
    imports = {"from cpcompile.testing import assert_equivalent"}
    args = [_source(model_factory, imports), f"tp={tp}", f"cp={cp}"]
    if dp != 1:
        args.append(f"dp={dp}")
    args += [f"prompts={_source(prompts, imports)}", f"max_new_tokens={max_new_tokens}"]
    if dtype is not None:
        args.append(f"dtype={_source(dtype, imports)}")
    if tolerance is not None:
        imports.add("from cpcompile.testing import Tolerance")
        args.append(f"tolerance={tolerance!r}")
    args += [f"{k}={_source(v, imports)}" for k, v in parallel_options.items()]
    call = "assert_equivalent(\n" + "".join(f"        {a},\n" for a in args) + "    )"
    body = "\n".join(sorted(imports, key=lambda s: (s.startswith("from"), s)))
    # The guard: World's ranks start from a fork server, which imports the main module.
    return f"{body}\n\nif __name__ == \"__main__\":\n    {call}\n"


# ----------------------------------------------------------------------------- entry point


_MESH_KEYS = ("tp", "cp", "dp", "combine", "ffn", "dp_inputs", "kv_interleave")


def _describe(options: dict) -> str:
    """The mesh with parallelize's defaults filled in (so dp, ffn, dp_inputs always show), then the rest."""
    from cpcompile import parallelize

    defaults = {k: p.default for k, p in inspect.signature(parallelize).parameters.items() if p.kind is p.KEYWORD_ONLY}
    full = {k: options.get(k, defaults.get(k)) for k in _MESH_KEYS}
    full.update((k, v) for k, v in options.items() if k not in _MESH_KEYS)
    return ", ".join(f"{k}={v!r}" for k, v in full.items())


def assert_equivalent(
    model_factory,
    *,
    tp: int,
    cp: int,
    dp: int = 1,
    prompts,
    max_new_tokens: int,
    world=None,
    dtype: torch.dtype | None = None,
    tolerance: Tolerance | None = None,
    **parallel_options,
) -> EquivalenceResult:
    """Check that `cpcompile.parallelize(model, tp=, cp=, dp=, **parallel_options)` on dp*tp*cp
    ranks computes the single-device model's logits and greedy tokens, step by step.

    model_factory: a picklable callable (module-level function or `functools.partial` of one)
        returning a fresh model with identical weights on every call (seed it, or load a local
        checkpoint). It is called once here and once on every rank.
    tp, cp, dp: the mesh. With dp > 1 the prompts' rows are split over the replicas as
        `parallelize` splits them (`split_rows`; at least dp rows are needed); with
        dp_inputs='local' each replica is given only its rows, left-padded to its own width.
    prompts: token-id lists (ragged: left-padded here, with id 0 under a zero mask) or an
        `(input_ids, attention_mask)` pair of left-padded [B, S] tensors.
    max_new_tokens: steps compared per row (step 0 is the prefill's last position).
    world: a `cpcompile.testing.World` of exactly dp*tp*cp ranks to reuse; None starts one for
        this call (and closes it after). At dp = tp = cp = 1 without a world, runs in this process.
    dtype: cast the model to this dtype (None: keep the factory's).
    tolerance: overrides `TOLERANCES[dtype]`.
    parallel_options: the rest of `parallelize`'s keywords (combine, ffn, dp_inputs,
        kv_interleave, lowering, max_length; max_length defaults to the widest prompt +
        max_new_tokens).

    Returns an `EquivalenceResult`; raises `AssertionError` at the first (step, row) that
    differs, with a snippet that reproduces it.
    """
    from cpcompile.testing.world import World

    if max_new_tokens < 1:
        raise ValueError(f"assert_equivalent: max_new_tokens={max_new_tokens}; expected at least 1 step to compare")
    for reserved in ("tp", "cp", "dp"):
        parallel_options.pop(reserved, None)
    try:
        pickle.dumps(model_factory)
    except Exception as e:
        raise TypeError(
            f"assert_equivalent: model_factory {model_factory!r} cannot be pickled ({e}); every rank calls it, so pass a "
            "module-level function or functools.partial of one (not a lambda or a local function)"
        ) from e
    n = tp * cp * dp
    if world is not None and world.n != n:
        raise ValueError(f"assert_equivalent: the world has {world.n} ranks but dp*tp*cp = {dp}*{tp}*{cp} = {n}")

    ids, mask = left_padded(prompts, pad_id=0)  # padding is masked: its id does not matter
    dp_inputs = parallel_options.get("dp_inputs", "global")
    if ids.shape[0] < dp:
        raise ValueError(
            f"assert_equivalent: {ids.shape[0]} prompt row(s) cannot be split over dp={dp} replicas "
            f"(dp_inputs={dp_inputs!r}): each replica needs at least one row, as parallelize's split_rows does. "
            f"Pass at least {dp} prompts, or fewer replicas."
        )
    ref_logits, ref_tokens, model_dtype = run_reference(model_factory, dtype, ids, mask, max_new_tokens)
    tol = tolerance or TOLERANCES.get(model_dtype)
    if tol is None:
        raise ValueError(f"assert_equivalent: no tolerance stated for dtype {model_dtype}; pass tolerance=Tolerance(...)")

    options = dict(tp=tp, cp=cp, dp=dp, max_length=ids.shape[1] + max_new_tokens)
    options.update(parallel_options)
    replicas = split_replicas(ids, mask, ref_tokens, dp, dp_inputs)
    args = (model_factory, dtype, replicas, max_new_tokens, options)
    if world is None and n == 1:
        results = [_parallel_rank(*args)]
    elif world is None:
        with World(n) as own:
            results = own.run(_parallel_rank, *args, timeout_s=WORLD_TIMEOUT_S)
    else:
        results = world.run(_parallel_rank, *args, timeout_s=WORLD_TIMEOUT_S)

    rank_errors = [(r, res["against"], res["rank_error"]) for r, res in enumerate(results) if r != res["against"]]
    result, failure = compare(ref_logits, ref_tokens, results[0]["logits"], rank_errors, tol)
    result.ranks_bitwise_equal = all(r["bitwise"] for r in results)
    if failure is not None:
        lengths = mask.sum(-1).tolist()
        where, split = "", ""
        if dp > 1:
            d = next(e for e, rows in enumerate(replicas.rows) if failure.row in rows)
            where = f" (replica {d}'s row {failure.row - replicas.rows[d].start}; its ranks {d * tp * cp}..{(d + 1) * tp * cp - 1})"
            split = f", rows per replica {[len(r) for r in replicas.rows]}"
        snippet = reproduction(model_factory, tp=tp, cp=cp, dp=dp, prompts=prompts, max_new_tokens=max_new_tokens,
                               dtype=dtype, tolerance=tolerance, parallel_options=parallel_options)
        raise AssertionError(
            f"assert_equivalent: the parallel run differs from the single-device model at step {failure.step} "
            f"(0 = prefill), batch row {failure.row}{where}.\n"
            f"  {failure.what}\n"
            f"  mesh/options: {_describe(options)}; dtype {model_dtype}; {len(lengths)} rows, prompt lengths {lengths}"
            f"{split}, {max_new_tokens} steps\n"
            f"  over all steps: max abs error {result.max_abs_error:.3g}, max rel error {result.max_rel_error:.3g}, "
            f"largest rank-vs-rank difference {result.max_rank_error:.3g}; near-ties seen: {len(result.near_ties)}\n"
            f"  tolerance: {tol}\n"
            f"Reproduce with:\n```python\n{snippet}```"
        )
    return result

"""`cpcompile.parallelize(model, ...)`: compile an unmodified HF decoder with cpcompile.

What it does to `model` (nothing else is edited):
  * captures the forward once to learn attention sites and projection roles, and validates
    the mesh against them (a bad mesh fails here, listing the valid ones);
  * replaces `model.forward` (an instance attribute; the class is untouched) by the serving
    engine (`cpcompile/serving.py`) around `torch.compile(forward, backend=cpcompile)`: it gives
    the model cpcompile's static `KVCache` in place of the empty cache `generate()` creates,
    runs batches in buckets and prompts in fixed-size chunks so that any request stream uses a
    bounded set of graphs (`serving.graph_bound`), and refuses a step that would run past
    `max_length` before anything is written.
  * turns off HF's own auto-compilation in `generate()` (it would wrap the wrapper in a second,
    non-cpcompile compile).
  * on more than one rank: checks the ranks that must see the same inputs do (all ranks, or a
    replica's ranks with dp_inputs='local'), cuts this replica's rows under dp > 1 and passes
    the step's replica layout into the graph (`cpcompile/data_parallel.py`); wraps
    `model.generate` to check every rank uses the same generation settings first.

`model.generate(...)` is then the ordinary HF API: greedy, sampling, batches with left padding.

This file orders the steps; each lives in its own module: the capture (`capture.py`), this rank's
weights (`sharding.py`), the runtime wrapper (`runtime.py`), the self-verification (`verify.py`).
"""

from __future__ import annotations

import torch

from cpcompile import verify as verification
from cpcompile.cache import kv_shapes
from cpcompile.capture import CaptureError, capture, first_line, meta_copy
from cpcompile.options import Options
from cpcompile.passes import Analysis
from cpcompile.runtime import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK, install
from cpcompile.serving import check_serving
from cpcompile.sharding import shard_model

DEFAULT_MAX_LENGTH = 2048


def parallelize(
    model: torch.nn.Module,
    *,
    tp: int = 1,
    cp: int = 1,
    dp: int = 1,
    combine: str = "all_to_all",
    ffn: str = "tp",
    dp_inputs: str = "global",
    kv_interleave: int = 1,
    vocab: str = "parallel",
    moe: str = "tp",
    mla_uv: str = "after",
    max_length: int = DEFAULT_MAX_LENGTH,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_batch: int = DEFAULT_MAX_BATCH,
    lowering: str = "inductor",
    debug_dir: str | None = None,
    verify: bool = True,
    checkpoint: str | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Compile `model` with cpcompile; returns the same model object, ready for `generate()`.

    Runs on `dp * tp * cp` ranks (DESIGN.md section 1). `ffn` places the FFN ('tp', 'sp',
    'world_tp'; section 3); `vocab` splits the token embedding and the LM head over the replica's
    ranks ('parallel', the default) or keeps them whole ('replicate'); `moe` splits MoE experts
    ('tp': every expert's intermediate dim over the FFN group; 'ep': whole experts); `mla_uv` places MLA's W_UV
    after the combine ('after', default) or before it ('before'; docs/mla.md); `dp_inputs` says whether every rank passes the same batch ('global':
    rows are split over the dp replicas and every rank gets the whole batch back) or each
    replica its own requests ('local'). `max_length` is the most tokens (prompt + generated)
    one sequence may reach; the KV cache is preallocated for it. Prompts run in chunks of at most `prefill_chunk` tokens and
    batches in buckets of up to `max_batch` rows (per replica), so any request stream compiles at
    most `serving.graph_bound(max_batch, prefill_chunk)` graphs (docs/serving.md).

    `verify` (default on): before returning, run a short seeded probe (a left-padded batch, a
    prefill and a decode step) through the model before and after sharding and raise
    `cpcompile.VerificationError`, naming the step and the first layer that differs, if the
    logits disagree (`cpcompile/verify.py`, docs/verification.md).

    `checkpoint` (a local model directory with safetensors weights): `model` holds no weights (its
    parameters are on the meta device, as `cpcompile.empty_model(path)` builds it) and each rank reads
    only its shards and the replicated parameters from the files, onto `device` (default
    `cuda:LOCAL_RANK` where CUDA is present, else CPU); see `cpcompile/loading.py`, docs/loading.md.
    Verification then runs on a small twin of the model (`verify.twin_model`).
    """
    if getattr(model, "_cpcompile", None) is not None:
        raise ValueError("parallelize: this model is already parallelized by cpcompile")
    options = Options.from_dict(
        dict(tp=tp, cp=cp, dp=dp, combine=combine, ffn=ffn, dp_inputs=dp_inputs, kv_interleave=kv_interleave,
             vocab=vocab, moe=moe, mla_uv=mla_uv, lowering=lowering, debug_dir=debug_dir)
    )  # validates; debug_dir falls back to env CPCOMPILE_DEBUG_DIR
    if max_length < 1:
        raise ValueError(f"parallelize: max_length={max_length}; expected a positive number of tokens")
    check_serving(prefill_chunk, max_batch)
    ckpt, device = _checkpoint_source(model, checkpoint, device)
    model.eval()
    traced = meta_copy(model) if ckpt is not None else model  # the graph does not depend on weight values
    try:
        analysis = capture(traced, options)  # validates the mesh; raises MeshError / AttentionError
        shapes = kv_shapes(traced)
    except (RuntimeError, NotImplementedError) as e:
        if ckpt is None or isinstance(e, CaptureError):
            raise
        raise CaptureError(
            f"cpcompile: {type(model).__name__} could not run on the meta device (no weights), which loading from "
            f"checkpoint= needs to trace it: {type(e).__name__}: {first_line(e)}. Some kernels check what only real "
            "devices need (for example grouped_mm's meta kernel accepts bf16 only: load with dtype=torch.bfloat16), or "
            "load the model whole and call cpcompile.parallelize(model)."
        ) from e
    probe_rows = min(2, max_batch) * (dp if dp_inputs == "global" else 1)
    ref = None
    if verify and ckpt is None:
        ref = verification.reference(model, probe_rows)  # while this rank holds the whole model
    twin_report = None
    if verify and ckpt is not None:  # before any weight is read: a plan that is wrong fails fast
        twin_report = _verify_twin(model, analysis, options, min(max_length, 256), prefill_chunk, max_batch, device)
    del traced
    ctx, weights = None, None
    if dp * tp * cp > 1:
        ctx, weights = shard_model(model, analysis, options, ckpt, device)
    if ckpt is not None:
        from cpcompile.loading import load_replicated

        load_replicated(model, ckpt, device)
    state = install(model, options, max_length, analysis, shapes, prefill_chunk, max_batch, ctx, weights)
    if ref is not None:
        state.verification = verification.check(model, ref, _describe(options), _cannot_locate(options))
    if twin_report is not None:
        state.verification = twin_report
    state.checkpoint = ckpt
    return model


def _checkpoint_source(model, checkpoint, device):
    """(Checkpoint, device) when the weights come from `checkpoint`, else (None, None); checks the
    model and the arguments agree (weights on meta exactly when a checkpoint is given)."""
    from cpcompile.loading import Checkpoint, check_covers, default_device, meta_parameters

    meta = meta_parameters(model)
    if checkpoint is None:
        if meta:
            raise ValueError(
                f"parallelize: {len(meta)} of the model's parameters are on the meta device (first: {meta[:3]}) and no "
                "checkpoint= was given to read them from. Pass checkpoint='path/to/model' (each rank then reads only "
                "its shards), or load the weights first."
            )
        if device is not None:
            raise ValueError("parallelize: device= places weights read from checkpoint=; move a loaded model with "
                             "model.to(device) instead")
        return None, None
    loaded = [n for n, p in model.named_parameters() if not p.is_meta]
    if loaded:
        raise ValueError(
            f"parallelize: checkpoint={str(checkpoint)!r} was given, but {len(loaded)} parameters already hold weights "
            f"(first: {loaded[:3]}). Build the model with cpcompile.empty_model(path) (parameters on meta, read per rank "
            "from the checkpoint), or pass the loaded model without checkpoint=."
        )
    meta_buffers = [n for n, b in model.named_buffers() if b.is_meta]
    if meta_buffers:
        raise ValueError(
            f"parallelize: the model's buffers {meta_buffers[:3]} are on the meta device: they are computed by the "
            "model's constructor (RoPE frequencies) and are not in the checkpoint. Build the model with "
            "cpcompile.empty_model(path), which puts only the parameters on meta."
        )
    ckpt = Checkpoint(checkpoint).for_model(model)
    check_covers(model, ckpt)
    return ckpt, torch.device(device) if device is not None else default_device()


def _verify_twin(model, analysis: Analysis, options: Options, max_length: int, prefill_chunk: int, max_batch: int,
                 device: torch.device) -> dict:
    """Self-verification without the whole model: parallelize a small twin on `device` and the same
    mesh with `verify=True` (`verify.twin_model`); its plan must be the model's, layer for layer."""
    o = options
    twin = verification.twin_model(model.config, o.dp * o.tp * o.cp).to(device)
    try:
        twin = parallelize(twin, tp=o.tp, cp=o.cp, dp=o.dp, combine=o.combine, ffn=o.ffn, dp_inputs=o.dp_inputs,
                           kv_interleave=o.kv_interleave, vocab=o.vocab, moe=o.moe, mla_uv=o.mla_uv, max_length=max_length, prefill_chunk=prefill_chunk,
                           max_batch=max_batch, lowering=o.lowering, verify=True)
        differs = verification.same_plan(analysis, twin._cpcompile.analysis)
        if differs:
            raise verification.VerificationError(
                f"cpcompile: the small twin of {type(model).__name__} that self-verification runs on is planned differently "
                f"from the model ({'; '.join(differs[:4])}), so it cannot stand for it. Pass verify=False to skip it "
                "(nothing then checks the plan before serving), or load the model whole and parallelize it."
            )
        return {**twin._cpcompile.verification, "twin": True}
    finally:
        del twin
        torch._dynamo.reset()


def _describe(o: Options) -> str:
    return (f"dp={o.dp}, tp={o.tp}, cp={o.cp} (combine={o.combine!r}, ffn={o.ffn!r}"
            + (f", dp_inputs={o.dp_inputs!r}" if o.dp > 1 else "") + ")")


def _cannot_locate(o: Options) -> str | None:
    """Why verification cannot compare per-layer hidden states on this mesh (they are split over ranks)."""
    if o.ffn == "sp" and o.cp > 1 or o.ffn == "world_tp" and o.dp > 1:
        return (f"The layer was not located: under ffn={o.ffn!r} the hidden states between layers are split over ranks. "
                f"parallelize the model at dp=1, tp={o.tp}, cp={o.cp}, ffn='tp' to locate it.")
    return None

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
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING
from dataclasses import dataclass

import torch

from cpcompile._hf import cache_arg, forward_parameters
from cpcompile.backend import Backend
from cpcompile.cache import KVCache, kv_shapes
from cpcompile.data_parallel import REPLICA_LAYOUT
from cpcompile.lockstep import check_same_inputs, lockstep_generate
from cpcompile.options import Options
from cpcompile.passes import Analysis, PassReport, analyze, run_passes
from cpcompile.passes.find_projections import input_names, param_names
from cpcompile.serving import Engine, check_serving, graph_bound
from cpcompile import verify as verification

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext
    from cpcompile.passes.shard_weights import RankWeights

DEFAULT_MAX_LENGTH = 2048
DEFAULT_PREFILL_CHUNK = 256
DEFAULT_MAX_BATCH = 16


@dataclass
class ParallelState:
    """What `parallelize` attached to a model (as `model._cpcompile`)."""

    options: Options
    max_length: int
    analysis: Analysis
    backend: Backend
    kv_shapes: list  # per layer (Hkv, Dk, Dv, dtype), see cpcompile.cache.kv_shapes
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    max_batch: int = DEFAULT_MAX_BATCH
    ctx: "RankContext | None" = None  # this rank and its process groups (None on one device)
    weights: "RankWeights | None" = None  # this rank's weight shards and local copies
    engine: "Engine | None" = None
    verification: dict | None = None  # the largest logit error per step of the self-verification probe
    checkpoint: "object | None" = None  # the cpcompile.loading.Checkpoint the weights were read from (bytes_read)

    @property
    def graph_bound(self) -> int:
        """The most graphs this model compiles, whatever the request stream (`serving.graph_bound`)."""
        return graph_bound(self.max_batch, self.prefill_chunk)

    @property
    def graphs(self) -> int:
        """Graphs compiled so far (Dynamo hands each to the backend once)."""
        return len(self.backend.reports)

    def check_inputs(self, ref: torch.Tensor, position: int = 0, logits_to_keep: int = 0) -> None:
        """The ranks that must see the same inputs do: all ranks, or a replica's with dp_inputs='local'.
        `position`: tokens the cache holds before this call (tells `generate()` a prompt from a token
        the ranks generated; cpcompile/lockstep.py)."""
        o = self.options
        if o.dp == 1 or o.dp_inputs == "global":
            check_same_inputs(ref, None, position, logits_to_keep)
        elif o.tp * o.cp > 1:
            check_same_inputs(ref, self.ctx.handles["replica"], position, logits_to_keep)


class CaptureError(ValueError):
    """The model's forward cannot be traced the way cpcompile needs (one graph over a static cache)."""


def user_frame(e: BaseException) -> str:
    """'(at modeling_gpt_neo.py:121 in _attn: `...`)': the innermost model frame Dynamo's message
    quotes ("from user code"), or '' if it quotes none."""
    from cpcompile.passes._fx import last_frame

    frame = last_frame(str(e))
    return f"(at {frame})" if frame else ""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def capture(model: torch.nn.Module, options: Options, max_length: int = 64, prompt_length: int = 4) -> Analysis:
    """Trace `model`'s forward once (a short prompt into a fresh cpcompile cache) and analyse it."""
    params = param_names(model)
    holder: list[Analysis] = []

    def analysing_backend(gm, example_inputs, **_):
        holder.append(analyze(gm, options, input_names(gm, example_inputs, params)))
        return gm.forward  # never run: we stop at the first graph

    cache = KVCache(_num_layers(model), max_length).allocate(model, 1)
    ids = torch.ones(1, prompt_length, dtype=torch.long, device=_device(model))
    _trace(model, model.forward, analysing_backend, holder,
           dict(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_arg(model): cache}, use_cache=True))
    return holder[0]


def trace_passes(model: torch.nn.Module, options: Options, analysis: Analysis, ctx: "RankContext | None",
                 weights: "RankWeights | None", max_length: int = 64, rows: int = 1,
                 tokens: int = 1) -> tuple[PassReport, torch.fx.GraphModule]:
    """Run every pass, for the rank `ctx`, on the graph of one forward of `rows` x `tokens` (by default
    a decode step: one row per replica, the first token of a cache of `max_length`) as the serving
    engine calls it: the cache of this rank's slots, the replica layout under dp > 1. The graph is
    rewritten, never run (`cpcompile.explain`). `analysis`: `capture`'s, at `options`' mesh."""
    from cpcompile.passes.absorb_latent import latent_layers

    params = param_names(model)
    holder: list = []
    latents = {s.index: s.latent for s in analysis.sites if s.latent is not None}

    def passes_backend(gm, example_inputs, **_):
        holder.append((run_passes(gm, options, 0, ctx, weights, input_names(gm, example_inputs, params), latents), gm))
        return _stop

    device = _device(model)
    cache = KVCache(_num_layers(model), max_length, cp=options.cp, cp_rank=ctx.cp_rank if ctx else 0,
                    kv_interleave=options.kv_interleave, tp=options.tp, tp_rank=ctx.tp_rank if ctx else 0,
                    latent=latent_layers(analysis.sites))  # as the serving engine allocates it (serving.py)
    if options.dp > 1 and (rows, tokens) != (1, 1):
        raise ValueError(f"trace_passes: rows={rows}, tokens={tokens} at dp={options.dp}; only a decode step's layout is traced")
    if tokens > max_length:
        raise ValueError(f"trace_passes: {tokens} tokens do not fit max_length={max_length}")
    cache.allocate_shapes(kv_shapes(model), rows, device)
    ids = torch.ones(rows, tokens, dtype=torch.long, device=device)
    mask = torch.zeros(rows, cache.max_length, dtype=torch.long, device=device)
    mask[:, :tokens] = 1
    kwargs = dict(attention_mask=mask, **{cache_arg(model): cache}, use_cache=True)
    params_in = set(forward_parameters(model))
    if "position_ids" in params_in:
        kwargs["position_ids"] = torch.arange(tokens, device=device).expand(rows, tokens)
    if "logits_to_keep" in params_in:
        kwargs["logits_to_keep"] = 1
    model_forward = model.forward

    def step(input_ids, **kw):
        if options.dp > 1:  # every replica's rows and tokens, as the engine marks them (data_parallel.py)
            input_ids = REPLICA_LAYOUT(input_ids, [1] * options.dp, [1] * options.dp)
        return model_forward(input_ids=input_ids, **kw)

    _trace(model, step, passes_backend, holder, dict(input_ids=ids, **kwargs))
    return holder[0]


def _stop(*args):
    raise RuntimeError("cpcompile: a graph traced for its passes only is never run")


def _trace(model, forward, backend, holder: list, kwargs: dict) -> None:
    """Compile `forward` with `backend` and call it once with `kwargs`: the backend sees the one graph
    and appends what it learns to `holder`. A refusal by the passes is raised as such."""
    fn = torch.compile(forward, backend=backend, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            try:
                fn(**kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                # our own analysis refused the model (MeshError / AttentionError): raise that, unwrapped
                raise e.inner_exception from None
            except RuntimeError as e:
                if not holder:  # a real tracing failure; the marker op raising after capture is expected
                    raise CaptureError(
                        f"cpcompile: {type(model).__name__}.forward could not be traced as one graph over cpcompile's "
                        f"preallocated KV cache (torch.compile fullgraph=True, static shapes): "
                        f"{type(e).__name__}: {first_line(e)}\ncpcompile needs the whole forward in one graph reading a "
                        "static cache; this model's code does not allow it (for example it sizes a bias by the cache's "
                        "length, as ALiBi does, or keeps a recurrent state beside the KV cache). Run it without cpcompile."
                    ) from e
    finally:
        torch._dynamo.reset()


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
        ctx, weights = _shard_model(model, analysis, options, ckpt, device)
    if ckpt is not None:
        from cpcompile.loading import load_replicated

        load_replicated(model, ckpt, device)
    backend = Backend(options, ctx, weights, params=lambda: param_names(model),
                      latents={s.index: s.latent for s in analysis.sites if s.latent is not None})
    state = ParallelState(options, max_length, analysis, backend, shapes, prefill_chunk, max_batch, ctx, weights)
    model_forward = model.forward

    def step(*args, replica_layout=None, **kwargs):
        if replica_layout is not None:  # the rows and tokens of every replica, as graph constants
            key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
            kwargs[key] = REPLICA_LAYOUT(kwargs[key], list(replica_layout[0]), list(replica_layout[1]))
        return model_forward(*args, **kwargs)

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    params = forward_parameters(model)
    signature = inspect.signature(model_forward)
    state.engine = Engine(state, compiled, set(params), cache_arg(model), _device(model), _num_layers(model))

    @functools.wraps(model_forward)
    def forward(*args, **kwargs):
        kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
        with torch.no_grad():  # inference only: the rewritten ops have no backward (AOT would trace one)
            return state.engine(kwargs)

    model._cpcompile_forward = model_forward
    model.forward = forward
    if state.ctx is not None:
        model.generate = lockstep_generate(model, state, model.generate)
    model._cpcompile = state
    model.generation_config.disable_compile = True
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


def meta_copy(model):
    """A copy of an empty model (parameters on meta) with its buffers on meta too, for capture."""
    import copy

    return copy.deepcopy(model).to("meta")


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


def _shard_model(model, analysis: Analysis, options: Options, ckpt=None, device=None):
    """This rank's context and weights: decide its weight shards, keep its local copies, and replace the model's full
    parameters for them by zero-storage stand-ins of the full shape (Dynamo then traces the
    single-device shapes; the graph reads the local copies). With `ckpt` the local copies are read
    from the checkpoint's files onto `device` (the model's parameters are on meta)."""
    from cpcompile.distributed import rank_context
    from cpcompile.passes.shard_weights import RankWeights, local_tensors, shard_weights

    device = device if ckpt is not None else _device(model)
    ctx = rank_context(options, device)
    shards = shard_weights(analysis, ctx)
    params = dict(model.named_parameters())
    local = {}
    for name, shard in shards.items():
        if name not in params:
            raise ValueError(
                f"cpcompile: the plan shards the linear weight {name}, which is not a parameter of the model (it is "
                "computed in the forward); cpcompile can shard only the model's own weights. Run with tp = cp = 1."
            )
        bias_name = shard.bias
        bias = params.get(bias_name) if bias_name else None
        if bias_name and bias is None:
            raise ValueError(
                f"cpcompile: the linear of {name} adds a bias that is not a parameter of the model ({bias_name}); "
                "cpcompile cannot shard it. Run with tp = cp = 1."
            )
        if ckpt is not None:  # presence and shapes were checked up front (loading.check_covers)
            w, b = ckpt.read_shard(shard)
            dtype = params[name].dtype
            local[name] = (w.to(device=device, dtype=dtype), b.to(device=device, dtype=bias.dtype) if b is not None else None)
        else:
            local[name] = local_tensors(shard, params[name].detach(), bias.detach() if bias is not None else None)
        for pname in (name, bias_name if bias is not None else None):
            if pname:
                _stand_in(model, params[pname], device)
    return ctx, RankWeights(shards, local)


def _stand_in(model, full: torch.nn.Parameter, device) -> None:
    """Replace `full` by a zero-storage stand-in of its shape, in every module that holds it (a tied
    embedding and LM head hold one Parameter twice), so no full copy stays referenced."""
    stub = torch.nn.Parameter(torch.empty(1, dtype=full.dtype, device=device).expand(full.shape), requires_grad=False)
    for mod in model.modules():
        for attr, p in list(mod._parameters.items()):
            if p is full:
                mod._parameters[attr] = stub


def weight_bytes(model) -> int:
    """Bytes of weights this rank really holds: the model's parameters (stand-ins count their
    one element) plus the local shards the compiled graph reads."""
    seen, total = set(), 0
    for p in model.parameters():
        st = p.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    state = getattr(model, "_cpcompile", None)
    if state is not None and state.weights is not None:
        for w, b in state.weights.local.values():
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total


def _num_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def _device(model) -> torch.device:
    return next(model.parameters()).device

"""Tracing an HF decoder's forward into one FX graph for cpcompile: `capture` (at `parallelize` and
`explain`: the analysis of the single-device graph) and `trace_passes` (one rank's graph with every pass
run, never executed: `explain`, the layout tests and benchmarks). Both trace over cpcompile's static
`KVCache`; a forward that cannot be one such graph is a `CaptureError` naming why."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cpcompile._hf import cache_arg, forward_parameters
from cpcompile.cache import KVCache, kv_shapes
from cpcompile.data_parallel import REPLICA_LAYOUT
from cpcompile.options import Options
from cpcompile.passes import Analysis, PassReport, analyze, run_passes
from cpcompile.passes.find_projections import input_names, param_names

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext
    from cpcompile.passes.shard_weights import RankWeights


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

    cache = KVCache(num_layers(model), max_length).allocate(model, 1)
    ids = torch.ones(1, prompt_length, dtype=torch.long, device=model_device(model))
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

    device = model_device(model)
    cache = KVCache(num_layers(model), max_length, cp=options.cp, cp_rank=ctx.cp_rank if ctx else 0,
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


def meta_copy(model):
    """A copy of an empty model (parameters on meta) with its buffers on meta too, for capture."""
    import copy

    return copy.deepcopy(model).to("meta")


def num_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def model_device(model) -> torch.device:
    return next(model.parameters()).device

"""The runtime wrapper `parallelize` installs: `ParallelState` (what it attaches to the model as
`model._cpcompile`) and `install`, which replaces `model.forward` (an instance attribute; the class is
untouched) by the serving engine (`cpcompile/serving.py`) around `torch.compile(step, backend=cpcompile)`,
wraps `model.generate` to check the ranks agree (`cpcompile/lockstep.py`) and turns off HF's own
auto-compilation in `generate()` (it would wrap the wrapper in a second, non-cpcompile compile)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cpcompile._hf import cache_arg, forward_parameters
from cpcompile.backend import Backend
from cpcompile.capture import model_device, num_layers
from cpcompile.data_parallel import REPLICA_LAYOUT
from cpcompile.lockstep import check_same_inputs, lockstep_generate
from cpcompile.options import Options
from cpcompile.passes import Analysis
from cpcompile.passes.find_projections import param_names
from cpcompile.serving import Engine, graph_bound

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext
    from cpcompile.passes.shard_weights import RankWeights

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


def install(model: torch.nn.Module, options: Options, max_length: int, analysis: Analysis, shapes: list,
            prefill_chunk: int, max_batch: int, ctx: "RankContext | None", weights: "RankWeights | None") -> ParallelState:
    """Put the serving engine in place of `model.forward` (module docstring); returns the state attached."""
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
    state.engine = Engine(state, compiled, set(params), cache_arg(model), model_device(model), num_layers(model))

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
    return state

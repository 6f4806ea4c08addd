"""The `cpcompile` torch.compile backend: Dynamo's graph -> passes -> lowering.

    model.forward = torch.compile(model.forward, backend="cpcompile", options={"lowering": "inductor"})

Registered under the name "cpcompile" through the `torch_dynamo_backends` entry point, so the
string works right after `pip install`. Every graph Dynamo hands over goes through
`cpcompile.passes.run_passes`; an attention the passes cannot rewrite raises there.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Callable

import torch
from torch import fx

from cpcompile.options import Options
from cpcompile.passes import PassReport, run_passes
from cpcompile.passes.shard_weights import RankWeights
from cpcompile.passes.find_projections import input_names

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext

_graph_ids = itertools.count()


class Backend:
    """A backend instance with its settings; keeps the pass report of every graph it compiled."""

    def __init__(
        self,
        options: Options | dict | None = None,
        ctx: "RankContext | None" = None,
        weights: RankWeights | None = None,
        params: Callable[[], dict[int, str]] | None = None,
        latents: dict | None = None,
    ):
        """`params()`: the model's parameter names by tensor identity, read at every compile
        (`find_projections.param_names`); parallelize passes it, the backend string has none.
        `ctx`, `weights`: this rank and its shards (`parallelize`); None on one device."""
        self.options = options if isinstance(options, Options) else Options.from_dict(options)
        o = self.options
        if o.tp * o.cp * o.dp != 1 and ctx is None:
            raise ValueError(
                f"cpcompile: tp={o.tp}, cp={o.cp}, dp={o.dp} through the backend string needs the weight shards "
                "and process groups that cpcompile.parallelize(model, tp=..., cp=...) sets up; use parallelize "
                "for a parallel model (the backend alone rewrites single-device graphs)."
            )
        self.ctx, self.weights = ctx, weights
        self.params = params
        self.reports: list[PassReport] = []
        # layer -> MLA structure (absorb_latent.LatentKV): parallelize's capture, else the first graph;
        # reused by every later graph instead of probing its expansion at serving sizes
        self.latents = latents

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **_) -> Callable:
        names = input_names(gm, example_inputs, self.params()) if self.params else None
        report = run_passes(gm, self.options, next(_graph_ids), self.ctx, self.weights, names, self.latents)
        self.reports.append(report)
        if self.latents is None:
            self.latents = {s.index: s.latent for s in report.analysis.sites if s.latent is not None}
        return lower(gm, example_inputs, self.options.lowering)


def cpcompile_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, **_) -> Callable:
    """The function behind `backend="cpcompile"`; `options` is torch.compile's `options=` dict."""
    return Backend(options)(gm, example_inputs)


def lower(gm: fx.GraphModule, example_inputs: list, lowering: str) -> Callable:
    if gm.meta.pop("cpcompile_constants", False):
        # The passes added buffers (weight shards, slot indices) Dynamo has no source for;
        # AOTAutograd asserts a 1:1 match for a graph tagged as Dynamo's, so drop the tag:
        # the graph is then compiled like any other GraphModule, its buffers as constants.
        gm.meta.pop("dynamo_compile_id", None)
    if lowering == "eager":
        return gm.forward
    if lowering == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)

"""Capture Dynamo graphs of tiny HF models (and toy modules) for pass tests."""

from __future__ import annotations

import torch

from cpcompile._hf import cache_arg
from cpcompile.cache import KVCache
from cpcompile.tiny import tiny_model


def capture_graph(fn, *args, **kwargs) -> torch.fx.GraphModule:
    """The (single) FX graph Dynamo produces for fn(*args, **kwargs), with example values in meta;
    `gm.example_inputs` keeps the real tensors Dynamo passed the backend (for `input_names`)."""
    graphs = []

    def backend(gm, example_inputs, **_):
        gm.example_inputs = list(example_inputs)
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    except RuntimeError as e:  # the cache-read marker raises when the unrewritten graph runs
        if "did not rewrite" not in str(e):
            raise
    assert len(graphs) == 1
    return graphs[0]


def hf_graph(arch: str, batch: int = 2, prompt: int = 5, max_length: int = 16, **model_kwargs):
    model = tiny_model(arch, **model_kwargs)
    cache = KVCache(model.config.num_hidden_layers, max_length).allocate(model, batch)
    ids = torch.randint(3, 200, (batch, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, max_length, dtype=torch.long)
    gm = capture_graph(model.forward, input_ids=ids, attention_mask=mask, **{cache_arg(model): cache}, use_cache=True)
    return model, gm


def weight_names(model, gm: torch.fx.GraphModule) -> dict:
    """The graph's weight inputs -> parameter names, by identity (what the backend computes)."""
    from cpcompile.passes.find_projections import input_names, param_names

    return input_names(gm, gm.example_inputs, param_names(model))

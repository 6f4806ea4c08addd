"""What cpcompile relies on in transformers, in one place (tests/test_hf_compat.py checks each).

transformers renamed the forward's cache argument from `past_key_values` to `cache` in 5.24
(a `@deprecate_kwarg` wrapper keeps the old name working until 5.40) and the output field with
it. cpcompile reads the name from the model's own forward signature instead of assuming one,
so both spellings work: `cache_arg(model)` for the argument, `output_cache(out)` for the field.

The rest of what the passes and the cache rely on (checked by the compatibility test):
  * `Cache` / `CacheLayerMixin` with `update`, `get_seq_length`, `get_mask_sizes(query_length)`
    on layers, and `Cache.get_mask_sizes(query_length, layer_idx)` / `get_query_offset`;
  * `create_causal_mask` building a `[B, 1, Lq, kv_length]` bool mask from a 2D padding mask
    and the cache's `get_mask_sizes`;
  * `generate()` passing the cache it created under `cache_arg(model)` and `logits_to_keep`.
"""

from __future__ import annotations

import inspect

import torch

CACHE_ARGS = ("cache", "past_key_values")  # newest first


def forward_parameters(model: torch.nn.Module) -> dict[str, inspect.Parameter]:
    """The parameters of `model.forward` as the user calls it (decorator wrappers followed)."""
    forward = getattr(model, "_cpcompile_forward", None) or model.forward
    return dict(inspect.signature(forward).parameters)


def cache_arg(model: torch.nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache (`cache` or `past_key_values`)."""
    params = forward_parameters(model)
    for name in CACHE_ARGS:
        if name in params:
            return name
    raise TypeError(
        f"cpcompile: {type(model).__name__}.forward takes no KV cache argument (looked for {CACHE_ARGS}; it has "
        f"{sorted(params)}). cpcompile serves decoders that take a transformers Cache; is this a causal LM?"
    )


def pop_cache(kwargs: dict):
    """Remove and return the cache from forward kwargs under either spelling (both given: an error)."""
    given = [k for k in CACHE_ARGS if kwargs.get(k) is not None]
    if len(given) > 1:
        raise TypeError(f"cpcompile: the forward got both {given[0]}= and {given[1]}=; pass the cache once")
    found = [kwargs.pop(k, None) for k in CACHE_ARGS]
    return next((c for c in found if c is not None), None)


def output_cache(out):
    """The cache a forward returned (`out.cache` since 5.24, `out.past_key_values` before)."""
    for name in CACHE_ARGS:
        if name in out:
            return out[name]
    return None

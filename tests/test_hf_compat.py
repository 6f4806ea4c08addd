"""What cpcompile relies on in transformers (cpcompile/_hf.py), checked one by one, so that a new
transformers release that changes one of them fails here with a message that names it, rather
than somewhere deep in a pass or as a wrong answer.

Run this first when raising the transformers bound in pyproject.toml.
"""

import inspect

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from cpcompile._hf import CACHE_ARGS, cache_arg, output_cache, pop_cache
from cpcompile.cache import KVCache
from cpcompile.tiny import ARCHITECTURES, tiny_model

VERSION = transformers.__version__


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_forward_takes_a_cache_argument_we_know(arch):
    model = tiny_model(arch)
    params = inspect.signature(model.forward).parameters
    found = [a for a in CACHE_ARGS if a in params]
    assert found, (
        f"transformers {VERSION}: {type(model).__name__}.forward takes none of {CACHE_ARGS} (it has {list(params)}); "
        "cpcompile passes its KV cache under that name: teach cpcompile/_hf.py the new one"
    )
    assert cache_arg(model) == found[0]
    for name in ("input_ids", "attention_mask", "position_ids", "logits_to_keep"):
        assert name in params, f"transformers {VERSION}: {type(model).__name__}.forward lost {name!r}, which the serving engine passes"


def test_the_forward_returns_the_cache_it_was_given():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.ones(1, 3, dtype=torch.long), **{cache_arg(model): cache}, use_cache=True)
    assert output_cache(out) is cache, f"transformers {VERSION}: the output's cache field is not one of {CACHE_ARGS}"
    assert out.logits.shape == (1, 3, model.config.vocab_size)


def test_cache_api_used_by_the_kv_cache():
    for method in ("update", "get_seq_length", "get_mask_sizes", "get_max_length", "reset", "lazy_initialization"):
        assert hasattr(CacheLayerMixin, method), f"transformers {VERSION}: CacheLayerMixin has no {method}()"
    for method in ("get_mask_sizes", "get_seq_length", "get_query_offset"):
        assert hasattr(Cache, method), f"transformers {VERSION}: Cache has no {method}()"
    sig = inspect.signature(Cache.get_mask_sizes)
    assert list(sig.parameters)[1] == "query_length", f"transformers {VERSION}: Cache.get_mask_sizes{sig} changed"
    cache = KVCache(2, 32)
    assert cache.get_mask_sizes(1, 0) == (32, 0)  # HF sizes its masks from the layer's answer
    assert not cache.is_compileable  # generate() then passes the 2D padding mask (see KVCache.is_compileable)


def test_mask_format():
    """create_causal_mask turns a 2D padding mask into a [B, 1, Lq, kv_length] bool mask sized by the
    cache's get_mask_sizes: the format rewrite_attention hands the kernel."""
    from transformers.masking_utils import create_causal_mask

    model = tiny_model("llama")
    cache = KVCache(model.config.num_hidden_layers, 16).allocate(model, 2)
    padding = torch.tensor([[0, 1, 1], [1, 1, 1]])
    emb = torch.zeros(2, 3, model.config.hidden_size)
    params = inspect.signature(create_causal_mask).parameters
    kw = {"cache" if "cache" in params else "past_key_values": cache}
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(3)
    mask = create_causal_mask(config=model.config, inputs_embeds=emb, attention_mask=padding, position_ids=torch.arange(3)[None], **kw)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == (2, 1, 3, 16), (
        f"transformers {VERSION}: create_causal_mask returned {type(mask).__name__} "
        f"{getattr(mask, 'dtype', None)} {tuple(getattr(mask, 'shape', ()))}; expected a bool [2, 1, 3, 16]"
    )
    assert mask[0, 0, 2].tolist() == [False, True, True] + [False] * 13  # padding and causality
    assert mask[1, 0, 0].tolist() == [True] + [False] * 15


def test_pop_cache_takes_either_spelling():
    c = object()
    assert pop_cache({"past_key_values": c}) is c
    kw = {"cache": c, "x": 1}
    assert pop_cache(kw) is c and kw == {"x": 1}
    with pytest.raises(TypeError, match="both cache= and past_key_values="):
        pop_cache({"cache": c, "past_key_values": c})


def test_checkpoint_key_renamings_we_use_exist():
    """Sharded loading (cpcompile/loading.py) names checkpoint keys with transformers' own load-time
    renamings (GPT-NeoX saves its head as `embed_out`, loads it as `lm_head`) and tells a converted
    tensor (per-expert MoE weights merged at load) apart from a renamed one."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    model = tiny_model("gpt_neox")
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    name, converted = rename_source_key("embed_out.weight", renamings, converters, model.base_model_prefix, model.state_dict())
    assert (name, converted) == ("lm_head.weight", None), (
        f"transformers {VERSION}: GPT-NeoX's `embed_out.weight` no longer loads as `lm_head.weight` through "
        "rename_source_key; update Checkpoint.for_model"
    )
    ds = tiny_model("deepseek_v3")
    transforms = get_model_conversion_mapping(ds)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    name, converted = rename_source_key("model.layers.1.mlp.experts.0.gate_proj.weight", renamings, converters,
                                        ds.base_model_prefix, ds.state_dict())
    assert name == "model.layers.1.mlp.experts.gate_up_proj" and converted is not None, (name, converted)

import pytest
import torch
from cpcompile._hf import cache_arg

from cpcompile import KVCache
from cpcompile.cache import CacheLayout
from cpcompile.tiny import tiny_model


def test_layout_slots_and_sink():
    assert CacheLayout(10, cp=1).local_slots == 10
    assert CacheLayout(10, cp=4).local_slots == 3  # ceil(10 / 4)
    assert CacheLayout(10, cp=2, kv_interleave=3).local_slots == 6  # ceil(10 / 6) * 3
    cache = KVCache(2, 10, cp=4, cp_rank=1).allocate(tiny_model("llama"), batch_size=3)
    layer = cache.layers[0]
    assert layer.keys.shape == (3, 2, 3 + 1, 16)  # [B, Hkv, S_local + sink, Dk]
    assert torch.equal(layer.slot_pos, torch.full((4,), -1))
    assert cache.kv_bytes() == 2 * 2 * (3 * 2 * 4 * 16) * 4


def test_deepseek_latent_cache_has_unequal_head_dims():
    cache = KVCache(2, 8).allocate(tiny_model("deepseek_v3"), batch_size=1)
    assert cache.layers[0].keys.shape[-1] == 16 and cache.layers[0].values.shape[-1] == 8  # latent, rope key


def test_reading_the_cache_outside_cpcompile_is_an_error():
    model = tiny_model("llama")
    cache = KVCache(2, 16).allocate(model, 1)
    with pytest.raises(RuntimeError, match="did not rewrite"):
        with torch.no_grad():
            model(torch.ones(1, 3, dtype=torch.long), **{cache_arg(model): cache}, use_cache=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_length=0), "max_length=0"),
    (dict(max_length=8, cp=2, cp_rank=2), "cp_rank=2 is outside 0..1"),
    (dict(max_length=8, kv_interleave=0), "kv_interleave=0"),
])
def test_bad_cache_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVCache(2, **kwargs)


class _OwnCacheModel(torch.nn.Module):
    """Refuses a transformers Cache the way MiniMax does (it keeps a MiniMaxCache of its own)."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig

        self.config = LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=8)
        self.embed = torch.nn.Embedding(8, 16)

    def forward(self, input_ids, past_key_values=None, use_cache=None):
        raise ValueError(f"Own uses cache of its own and is not compatible with `cache` of type {type(past_key_values)}.")


def test_a_model_with_its_own_cache_class_is_refused_by_name():
    from cpcompile.cache import kv_shapes

    with pytest.raises(ValueError, match=r"_OwnCacheModel refuses a transformers Cache \(Own uses cache of its own.*cannot replace"):
        kv_shapes(_OwnCacheModel())


def test_latent_layers_keep_one_joint_buffer_split_over_the_replica():
    """An MLA layer at tp=2, cp=2: one [c | r] buffer, its slots over all 4 ranks (replica rank 3 here)."""
    cache = KVCache(2, 10, cp=2, cp_rank=1, tp=2, tp_rank=1, latent={0, 1}).allocate(tiny_model("deepseek_v3"), batch_size=3)
    layer = cache.layers[0]
    assert layer.latent and layer.layout.cp == 4 and layer.layout.cp_rank == 3 and layer.layout.tp == 1
    assert layer.keys.shape == (3, 1, 3 + 1, 16 + 8)  # [B, 1, ceil(10/4) + sink, R + Dr]
    assert layer.values.numel() == 0
    assert cache.kv_bytes() == 2 * (3 * 1 * 4 * 24) * 4  # exactly the latent: 24 values per slot, nothing expanded

"""This rank's columns of every sharded linear, found by dependency probing (no process group needed)."""

import pytest

from cpcompile.distributed import RankContext
from cpcompile.options import Options
from cpcompile.capture import capture
from cpcompile.passes.shard_weights import head_ranges, shard_weights
from cpcompile.tiny import tiny_model


def _shards(arch, tp, cp, rank, combine="all_to_all"):
    analysis = capture(tiny_model(arch), Options(tp=tp, cp=cp, combine=combine))  # planned for this mesh
    return shard_weights(analysis, RankContext(tp, cp, 1, combine, rank=rank))


def _cols(shards, fragment):
    (name,) = [n for n in shards if fragment in n and ".0." in n]
    return shards[name].cols.tolist()


def test_llama_tp2_rank1():
    s = _shards("llama", 2, 1, 1)  # Hq=4, Hkv=2, D=16, I=128
    assert _cols(s, "q_proj") == list(range(32, 64))  # query heads 2, 3
    assert _cols(s, "k_proj") == list(range(16, 32)) and _cols(s, "v_proj") == list(range(16, 32))
    assert _cols(s, "o_proj") == list(range(32, 64))  # row: the inputs of heads 2, 3
    assert _cols(s, "gate_proj") == _cols(s, "up_proj") == _cols(s, "down_proj") == list(range(64, 128))


def test_phi3_packed_qkv_and_gate_up():
    s = _shards("phi3", 2, 1, 1)
    # qkv_proj rows: q [0, 64), k [64, 96), v [96, 128); rank 1 keeps q heads 2-3 and KV head 1
    assert _cols(s, "qkv_proj") == list(range(32, 64)) + list(range(80, 96)) + list(range(112, 128))
    # gate_up rows: gate [0, 128), up [128, 256); rank 1 keeps the second half of each
    assert _cols(s, "gate_up_proj") == list(range(64, 128)) + list(range(192, 256))


def test_gpt_neox_interleaved_qkv():
    s = _shards("gpt_neox", 2, 1, 0)  # per head [q_h, k_h, v_h] of 16 each; rank 0 keeps heads 0, 1
    assert _cols(s, "query_key_value") == list(range(0, 96))


def test_kv_head_replicated_when_tp_exceeds_hkv():
    for rank, head in ((0, 0), (1, 0), (2, 1), (3, 1)):
        s = _shards("llama", 4, 1, rank)
        assert _cols(s, "k_proj") == list(range(16 * head, 16 * head + 16))
        assert _cols(s, "q_proj") == list(range(16 * rank, 16 * rank + 16))


@pytest.mark.parametrize("combine, heads", [("all_to_all", (3, 4)), ("ag_rs", (3, 4)), ("all_gather", (2, 4))])
def test_o_proj_follows_the_combine(combine, heads):
    ctx = RankContext(2, 2, 1, combine, rank=3)  # tp_rank 1, cp_rank 1
    assert head_ranges(ctx, 4)["out"] == heads
    s = _shards("llama", 2, 2, 3, combine)
    assert _cols(s, "o_proj") == list(range(16 * heads[0], 16 * heads[1]))
    assert _cols(s, "down_proj") == list(range(96, 128))  # replica rank 3 of 4: the last I/4

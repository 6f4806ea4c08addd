"""Self-verification at parallelize: on by default, silent when right, precise when wrong."""

import pytest
import torch

import cpcompile
from cpcompile import VerificationError, parallelize
from cpcompile import verify as verification
from cpcompile.tiny import tiny_model


def test_on_by_default_compiles_the_probe_graphs_and_leaves_the_rng_alone():
    model = tiny_model("llama")
    rng = torch.get_rng_state()
    parallelize(model, max_length=32, lowering="eager")
    state = model._cpcompile
    assert torch.equal(torch.get_rng_state(), rng)  # the probe draws from its own generator
    assert set(state.verification) == {"prefill", "decode"}
    assert max(state.verification.values()) < verification.TOLERANCES[torch.float32][0]
    # the graphs generate() compiles for a two-row batch and a short prompt: prefill (last logits) + decode
    assert state.engine.keys == {(2, 16, "last", "input_ids", None), (2, 1, "last", "input_ids", None)}
    out = model.generate(torch.tensor([[5, 6, 7], [0, 8, 9]]), attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
                         max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 6) and state.graphs == 2  # generate() reused them


def test_verify_false_compiles_nothing_at_parallelize():
    model = parallelize(tiny_model("llama"), max_length=32, lowering="eager", verify=False)
    assert model._cpcompile.verification is None and model._cpcompile.graphs == 0


def _corrupt_after_reference(monkeypatch, layer: int):
    """Let the reference see the model as it is, then break one layer's o_proj: what a wrong
    sharding of that layer looks like from outside."""
    real = verification.reference

    def reference(model, rows=2):
        ref = real(model, rows)
        with torch.no_grad():
            model.model.layers[layer].self_attn.o_proj.weight[:, :4] += 1.0
        return ref

    monkeypatch.setattr(verification, "reference", reference)


def test_a_wrong_layer_is_named_with_the_step_and_the_error(monkeypatch):
    _corrupt_after_reference(monkeypatch, layer=1)
    with pytest.raises(VerificationError) as e:
        parallelize(tiny_model("llama"), max_length=32, lowering="eager")
    msg = str(e.value)
    assert "self-verification failed on dp=1, tp=1, cp=1 (combine='all_to_all', ffn='tp')" in msg
    assert "at the prefill step" in msg and "tolerance for float32: 0.0001" in msg
    assert "The first hidden state that differs is the output of layer 1" in msg
    assert "everything before it agrees" in msg
    assert "cpcompile.explain(" in msg and "verify=False" in msg
    assert isinstance(e.value, ValueError)  # a VerificationError is a ValueError: callers catching those still do


def test_error_without_a_layer_when_hidden_states_are_split():
    from cpcompile.options import Options
    from cpcompile.parallelize import _cannot_locate

    assert _cannot_locate(Options(tp=2, cp=2)) is None
    assert "ffn='tp' to locate it" in _cannot_locate(Options(tp=1, cp=2, ffn="sp"))
    assert "ffn='tp' to locate it" in _cannot_locate(Options(dp=2, ffn="world_tp"))


def run_with_wrong_shard(layer: int):
    """On each rank: parallelize at tp=2 with one column of `layer`'s down_proj shard zeroed on rank 1
    (a sharding bug as the ranks would see it); returns the error each rank raised."""
    import torch.distributed as dist

    import cpcompile.passes.shard_weights as sw

    real = sw.local_tensors

    def local_tensors(shard, weight, bias):
        w, b = real(shard, weight, bias)
        if dist.get_rank() == 1 and shard.weight == f"model.layers.{layer}.mlp.down_proj.weight":
            w = w.clone()
            w[:, 0] = 0
        return w, b

    sw.local_tensors = local_tensors
    try:
        parallelize(tiny_model("llama"), tp=2, max_length=32, lowering="eager")
    except VerificationError as e:
        return str(e)
    finally:
        sw.local_tensors = real
    return None


def test_every_rank_raises_and_names_the_layer(world2):
    messages = world2.run(run_with_wrong_shard, 0)
    for msg in messages:  # rank 0's own shard was right: it raises too (the decision is agreed)
        assert msg is not None and "tp=2" in msg
        assert "The first hidden state that differs is the output of layer 0" in msg


def test_public_name():
    assert cpcompile.VerificationError is VerificationError


def test_twin_config_keeps_what_decides_the_plan():
    """The twin `parallelize(..., checkpoint=)` verifies on (verify.twin_config): fewer layers but every
    layer type, a dense and an MoE layer, head counts and head dims kept, narrow widths divisible by
    the ranks, token ids inside the shrunk vocab."""
    from cpcompile.tiny import tiny_config
    from cpcompile.verify import TWIN_VOCAB, twin_config

    big = tiny_config("gemma2", num_hidden_layers=8, vocab_size=50000, intermediate_size=4096, hidden_size=1024,
                      pad_token_id=49999, layer_types=["sliding_attention"] * 3 + ["full_attention"] * 5)
    t = twin_config(big, world=4)
    assert t.num_hidden_layers == 4 and t.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (4, 2, 16)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size) == (TWIN_VOCAB, 128, 64)
    assert t.pad_token_id < TWIN_VOCAB and big.vocab_size == 50000  # the model's config is untouched
    ds = twin_config(tiny_config("deepseek_v3", num_hidden_layers=5, first_k_dense_replace=2), world=2)
    assert ds.num_hidden_layers == 3 and ds.n_routed_experts == 4 and ds.kv_lora_rank == 16

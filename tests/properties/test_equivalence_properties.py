"""The promise, as properties: for every architecture cpcompile runs in parallel, any small
config of it, any mesh (dp, tp, cp, combine, ffn, kv_interleave, dp_inputs) of at most 4 ranks
it can take, and any batch of left-padded prompts (some shorter than cp, at least one row per
replica), the parallel model's logits and greedy tokens equal the single-device model's, step
by step (`assert_equivalent`, forced decoding).

Lowering "eager": the passes and collectives are what is tested; Inductor and AOT are covered
by tests/distributed/test_parallelize.py::test_compiled_lowerings.
"""

import functools

import pytest
import transformers
from hypothesis import event, given
from hypothesis import strategies as st

from cpcompile.testing import FP32_TOLERANCE, assert_equivalent
from cpcompile.testing.strategies import (
    MOE_ARCHITECTURES,
    PARALLEL_ARCHITECTURES,
    MLA_ARCHITECTURES,
    meshes,
    prompts,
    tiny_configs,
    tiny_model_from_config,
)


def _check(worlds, config, mesh, batch, steps, seed):
    # `--hypothesis-show-statistics` shows how the meshes drawn spread over dp, ffn and input modes
    event(f"dp={mesh.dp} tp={mesh.tp} cp={mesh.cp} ffn={mesh.ffn} dp_inputs={mesh.dp_inputs} moe={mesh.moe}")
    result = assert_equivalent(
        functools.partial(tiny_model_from_config, config, seed=seed),
        **mesh.options(), prompts=batch, max_new_tokens=steps, lowering="eager",
        world=worlds(mesh.world) if mesh.world > 1 else None,
    )
    assert result.steps == steps and result.rows == len(batch)
    assert result.max_abs_error <= FP32_TOLERANCE.atol
    assert result.ranks_bitwise_equal  # the final hidden state is all-reduced, the logits all-gathered


@pytest.mark.parametrize("arch", PARALLEL_ARCHITECTURES)
@given(data=st.data())
def test_parallel_equals_single_device(worlds, arch, data):
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(meshes(config, max_world=4, min_world=2), label="mesh")
    batch = data.draw(prompts(config.vocab_size, max_batch=3, max_len=7, cp=mesh.cp, min_batch=mesh.dp), label="prompts")
    steps = data.draw(st.integers(1, 5), label="max_new_tokens")
    _check(worlds, config, mesh, batch, steps, data.draw(st.integers(0, 3), label="seed"))


@given(data=st.data())
def test_moe_parallel_equals_single_device(worlds, data):
    """MoE models (Mixtral; Qwen2-MoE with a shared expert), 2-8 experts, top-1 to top-3, under
    either expert placement (`moe` 'tp' or 'ep') drawn with the mesh."""
    arch = data.draw(st.sampled_from(MOE_ARCHITECTURES), label="arch")
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(meshes(config, max_world=4, min_world=2), label="mesh")
    batch = data.draw(prompts(config.vocab_size, max_batch=3, max_len=7, cp=mesh.cp, min_batch=mesh.dp), label="prompts")
    _check(worlds, config, mesh, batch, data.draw(st.integers(1, 4), label="max_new_tokens"), data.draw(st.integers(0, 3), label="seed"))


@pytest.mark.parametrize("arch", MLA_ARCHITECTURES)
@given(data=st.data())
def test_mla_parallel_equals_single_device(worlds, arch, data):
    """DeepSeek-V3 (MLA + MoE; q_lora_rank set or None): absorbed attention over the latent slots
    split over tp*cp ranks, any mesh of 2-4 ranks it can take, equals HF's."""
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(meshes(config, max_world=4, min_world=2), label="mesh")
    batch = data.draw(prompts(config.vocab_size, max_batch=2, max_len=6, min_batch=mesh.dp), label="prompts")
    _check(worlds, config, mesh, batch, data.draw(st.integers(1, 4), label="max_new_tokens"), 0)


def _ag_rs_llama(num_attention_heads):
    return transformers.LlamaConfig(vocab_size=64, hidden_size=8 * num_attention_heads, head_dim=8, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=num_attention_heads, num_key_value_heads=1,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("heads", [1, 3])
def test_regression_ag_rs_with_heads_not_divisible_by_cp(heads):
    """Found by the property above: the plan accepted combine='ag_rs' with Hq/tp % cp != 0 and the
    rewrite then failed on a reshape; the plan now refuses it with the valid choices."""
    from cpcompile import parallelize
    from cpcompile.passes.plan import MeshError

    model = tiny_model_from_config(_ag_rs_llama(heads), seed=0)
    with pytest.raises(MeshError, match=r"(?s)combine='ag_rs' needs Hq/tp=\d divisible by cp=2.*Valid \(tp, cp\)"):
        parallelize(model, tp=1, cp=2, combine="ag_rs")

"""The strategies draw what they promise: configs HF builds, meshes `plan.valid_meshes` agrees
with (on the captured graph) at every dp and ffn, invalid meshes it refuses, prompts within bounds."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcompile.options import Options
from cpcompile.capture import capture
from cpcompile.options import COMBINES, FFNS, MOES
from cpcompile.passes.plan import valid_meshes
from cpcompile.testing.strategies import (
    FIRST_TOKEN,
    MOE_ARCHITECTURES,
    PARALLEL_ARCHITECTURES,
    MLA_ARCHITECTURES,
    invalid_meshes,
    meshes,
    mesh_problems,
    prompts,
    tiny_configs,
    tiny_model_from_config,
    valid_meshes_of,
)

BOUNDED = settings(max_examples=4, derandomize=True, deadline=None, database=None)


@pytest.mark.parametrize("arch", PARALLEL_ARCHITECTURES + MOE_ARCHITECTURES)
@BOUNDED
@given(data=st.data())
def test_mesh_rules_agree_with_the_plan(arch, data):
    config = data.draw(tiny_configs(arch), label="config")
    assert 1 <= config.num_hidden_layers <= 2 and config.hidden_size <= 128
    analysis = capture(tiny_model_from_config(config), Options())  # HF builds it; cpcompile finds every site
    assert len(analysis.sites) == config.num_hidden_layers
    _agree_at_every_dp_and_ffn(config, analysis)
    mesh = data.draw(meshes(config), label="mesh")
    assert mesh.world <= 4 and not mesh_problems(config, mesh.tp, mesh.cp, mesh.combine, mesh.dp, mesh.ffn, mesh.moe)
    assert (mesh.tp, mesh.cp) in valid_meshes(analysis.roles, analysis.sites, 4, mesh.combine, mesh.dp, mesh.ffn, mesh.moe)
    bad = data.draw(invalid_meshes(config), label="invalid mesh")
    assert (bad.tp, bad.cp) not in valid_meshes(analysis.roles, analysis.sites, 16, bad.combine, bad.dp, bad.ffn)


def _agree_at_every_dp_and_ffn(config, analysis, max_world=8):
    for combine in COMBINES:
        assert valid_meshes_of(config, max_world, combine) == valid_meshes(analysis.roles, analysis.sites, max_world, combine)
        for dp in range(1, 5):
            for ffn in FFNS:
                for moe in MOES:
                    ours = valid_meshes_of(config, max_world, combine, dp, ffn, moe)
                    assert ours == valid_meshes(analysis.roles, analysis.sites, max_world, combine, dp, ffn, moe), (combine, dp, ffn, moe)
    if config.model_type in MOE_ARCHITECTURES:  # the experts were found: every layer has an expert pair
        assert sorted(p.layer for p in analysis.roles.projections if p.role == "expert_down") == list(range(config.num_hidden_layers))


@pytest.mark.parametrize("arch", MLA_ARCHITECTURES)
@BOUNDED
@given(data=st.data())
def test_mla_mesh_rules_agree_with_the_plan(arch, data):
    config = data.draw(tiny_configs(arch))
    analysis = capture(tiny_model_from_config(config), Options())
    _agree_at_every_dp_and_ffn(config, analysis)
    assert all(s.latent is not None for s in analysis.sites)  # every layer's attention absorbed


def test_meshes_draw_every_dp_ffn_and_input_mode():
    import transformers
    from hypothesis import find

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, head_dim=8, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    for dp in (2, 3, 4):
        for ffn in FFNS:
            for inputs in ("global", "local"):
                find(meshes(config, max_world=4), lambda m: (m.dp, m.ffn, m.dp_inputs) == (dp, ffn, inputs),
                     settings=settings(database=None, max_examples=2000))
    assert find(meshes(config, max_world=4, dps=(1,)), lambda m: True).dp == 1


@settings(max_examples=200, derandomize=True, database=None)
@given(cp=st.integers(1, 4), dp=st.integers(1, 4), data=st.data())
def test_prompts_are_within_bounds(cp, dp, data):
    batch = data.draw(prompts(vocab=64, max_batch=3, max_len=6, cp=cp, min_batch=dp))
    assert dp <= len(batch) <= max(3, dp)
    assert all(1 <= len(p) <= 6 and all(FIRST_TOKEN <= t < 64 for t in p) for p in batch)


def test_prompts_include_ragged_batches_and_prompts_shorter_than_cp():
    from hypothesis import find

    find(prompts(vocab=64, max_batch=3, max_len=6, cp=3), lambda b: len({len(p) for p in b}) > 1,
         settings=settings(database=None))
    find(prompts(vocab=64, max_batch=3, max_len=6, cp=3), lambda b: any(len(p) < 3 for p in b) and len(b) > 1,
         settings=settings(database=None))

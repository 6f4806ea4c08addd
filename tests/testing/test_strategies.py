"""The strategies draw what they promise: configs HF builds, meshes `plan.valid_meshes` agrees
with (on the captured graph), invalid meshes it refuses, prompts within bounds."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcompile.options import Options
from cpcompile.parallelize import capture
from cpcompile.passes.plan import COMBINES, valid_meshes
from cpcompile.testing.strategies import (
    FIRST_TOKEN,
    PARALLEL_ARCHITECTURES,
    SINGLE_DEVICE_ONLY,
    invalid_meshes,
    meshes,
    mesh_problems,
    prompts,
    tiny_configs,
    tiny_model_from_config,
    valid_meshes_of,
)

BOUNDED = settings(max_examples=4, derandomize=True, deadline=None, database=None)


@pytest.mark.parametrize("arch", PARALLEL_ARCHITECTURES)
@BOUNDED
@given(data=st.data())
def test_mesh_rules_agree_with_the_plan(arch, data):
    config = data.draw(tiny_configs(arch), label="config")
    assert 1 <= config.num_hidden_layers <= 2 and config.hidden_size <= 128
    analysis = capture(tiny_model_from_config(config), Options())  # HF builds it; cpcompile finds every site
    assert len(analysis.sites) == config.num_hidden_layers
    for combine in COMBINES:
        assert valid_meshes_of(config, 8, combine) == valid_meshes(analysis.roles, analysis.sites, 8, combine)
    mesh = data.draw(meshes(config), label="mesh")
    assert mesh.world <= 4 and not mesh_problems(config, mesh.tp, mesh.cp, mesh.combine)
    bad = data.draw(invalid_meshes(config), label="invalid mesh")
    assert (bad.tp, bad.cp) not in valid_meshes(analysis.roles, analysis.sites, 16, bad.combine)


@pytest.mark.parametrize("arch", SINGLE_DEVICE_ONLY)
@BOUNDED
@given(data=st.data())
def test_single_device_architectures_draw_only_the_trivial_mesh(arch, data):
    config = data.draw(tiny_configs(arch))
    capture(tiny_model_from_config(config), Options())
    assert data.draw(meshes(config)).world == 1


@settings(max_examples=200, derandomize=True, database=None)
@given(cp=st.integers(1, 4), data=st.data())
def test_prompts_are_within_bounds(cp, data):
    batch = data.draw(prompts(vocab=64, max_batch=3, max_len=6, cp=cp))
    assert 1 <= len(batch) <= 3
    assert all(1 <= len(p) <= 6 and all(FIRST_TOKEN <= t < 64 for t in p) for p in batch)


def test_prompts_include_ragged_batches_and_prompts_shorter_than_cp():
    from hypothesis import find

    find(prompts(vocab=64, max_batch=3, max_len=6, cp=3), lambda b: len({len(p) for p in b}) > 1,
         settings=settings(database=None))
    find(prompts(vocab=64, max_batch=3, max_len=6, cp=3), lambda b: any(len(p) < 3 for p in b) and len(b) > 1,
         settings=settings(database=None))

"""Errors as properties: every mesh a model cannot take (heads, projection widths, the FFN group
of ffn='tp' / 'sp' / 'world_tp' at any dp) is refused at `parallelize`, naming the problem and
listing the (tp, cp) it can take at that dp and ffn; a valid mesh on a world of another size is
refused with both numbers; a global batch smaller than dp and ranks that disagree about
generation settings are refused on every rank (none hangs)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcompile.options import COMBINES
from cpcompile.passes.plan import MeshError
from cpcompile.testing import WorldError
from cpcompile.testing.strategies import (
    PARALLEL_ARCHITECTURES,
    Mesh,
    invalid_meshes,
    mesh_problems,
    meshes,
    tiny_configs,
    tiny_model_from_config,
    valid_meshes_of,
)

# Refusals only capture the graph (no compile): cheap, so more examples than the equivalence tests.
CHEAP = settings(max_examples=3 * settings.default.max_examples)


def parallelize_at(config, **options):
    from cpcompile import parallelize

    return parallelize(tiny_model_from_config(config), lowering="eager", **options)


def _expected_header(mesh) -> str:
    return (f"this model cannot run at dp={mesh.dp}, tp={mesh.tp}, cp={mesh.cp}, combine={mesh.combine!r}, "
            f"ffn={mesh.ffn!r}:")


def _expected_listing(config, mesh) -> str:
    valid = valid_meshes_of(config, max(16, mesh.world), mesh.combine, mesh.dp, mesh.ffn)
    at = f", dp={mesh.dp}, ffn={mesh.ffn!r}" if (mesh.dp, mesh.ffn) != (1, "tp") else ""
    return f"Valid (tp, cp) for this model with combine={mesh.combine!r}{at}: {valid}"


def _refused(worlds, config, mesh) -> str:
    """parallelize at `mesh` as a user would (on a world of its size; in-process past 4 ranks,
    where the plan refuses before a process group is needed); the error message."""
    if mesh.world <= 4:
        with pytest.raises(WorldError) as err:
            worlds(mesh.world).run(parallelize_at, config, **mesh.options())
        assert len(err.value.tracebacks) == mesh.world  # every rank refuses, none hangs
        assert all("MeshError" in tb for tb in err.value.tracebacks.values())
        return str(err.value)
    with pytest.raises(MeshError) as err:
        parallelize_at(config, **mesh.options())
    return str(err.value)


@CHEAP
@pytest.mark.parametrize("dps", [(1,), (2, 3, 4)], ids=["dp=1", "dp>1"])
@given(data=st.data())
def test_invalid_mesh_is_refused_listing_valid_ones(worlds, dps, data):
    arch = data.draw(st.sampled_from(PARALLEL_ARCHITECTURES), label="arch")
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(invalid_meshes(config, max_world=8, dps=dps), label="mesh")
    message = _refused(worlds, config, mesh)
    assert _expected_header(mesh) in message
    assert _expected_listing(config, mesh) in message


def _only_the_ffn_does_not_fit(config, max_world: int) -> list[Mesh]:
    """Meshes whose attention and o_proj fit but whose FFN group (tp for ffn='sp', dp*tp*cp for
    'world_tp') does not divide the intermediate size (never empty: dp=7 under 'world_tp')."""
    out = []
    for dp, tp, cp in [(d, t, c) for d in range(1, max_world + 1) for t in range(1, max_world // d + 1)
                       for c in range(1, max_world // (d * t) + 1)]:
        for combine in COMBINES:
            for ffn in ("sp", "world_tp"):
                problems = mesh_problems(config, tp, cp, combine, dp, ffn)
                if problems and all(p.startswith("ffn width") for p in problems):
                    out.append(Mesh(tp, cp, dp, combine, ffn))
    return out


@CHEAP
@given(data=st.data())
def test_ffn_group_that_does_not_divide_the_ffn_is_refused(worlds, data):
    """The message names the FFN weights' features and the group they do not divide."""
    arch = data.draw(st.sampled_from(PARALLEL_ARCHITECTURES), label="arch")
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(st.sampled_from(_only_the_ffn_does_not_fit(config, max_world=8)), label="mesh")
    message = _refused(worlds, config, mesh)
    assert _expected_header(mesh) in message and _expected_listing(config, mesh) in message
    group, name = (mesh.tp, "tp") if mesh.ffn == "sp" else (mesh.world, "world")
    assert re.search(rf"features {config.intermediate_size} not divisible by {group} \(\S+/{name}\)", message), message


@given(data=st.data())  # each example captures the model on every rank; the size check is arithmetic
def test_valid_mesh_on_a_world_of_another_size_is_refused(worlds, data):
    arch = data.draw(st.sampled_from(PARALLEL_ARCHITECTURES), label="arch")
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(meshes(config, max_world=4, min_world=2), label="mesh")  # dp=2 fits every config
    n = data.draw(st.sampled_from([k for k in (2, 3, 4) if k != mesh.world]), label="world")
    pattern = re.escape(f"process group has {n} ranks but dp*tp*cp = {mesh.dp}*{mesh.tp}*{mesh.cp} = {mesh.world}")
    with pytest.raises(WorldError, match=pattern):
        worlds(n).run(parallelize_at, config, **mesh.options())


def forward_rows(config, rows: int, **options):
    """parallelize, then one forward of a global batch of `rows` one-token prompts."""
    import torch

    model = parallelize_at(config, **options)
    model(input_ids=torch.full((rows, 1), 5), attention_mask=torch.ones(rows, 1, dtype=torch.long))


@settings(max_examples=max(2, settings.default.max_examples // 2))
@given(data=st.data())
def test_global_batch_smaller_than_dp_is_refused(worlds, data):
    arch = data.draw(st.sampled_from(PARALLEL_ARCHITECTURES), label="arch")
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(meshes(config, max_world=4, dps=(2, 3, 4), dp_inputs=("global",)), label="mesh")
    rows = data.draw(st.integers(1, mesh.dp - 1), label="rows")
    with pytest.raises(WorldError) as err:
        worlds(mesh.world).run(forward_rows, config, rows, **mesh.options())
    assert len(err.value.tracebacks) == mesh.world  # every rank refuses, none waits in a collective
    assert f"a global batch of {rows} row(s) cannot be split over dp={mesh.dp} replicas" in str(err.value)
    assert "dp_inputs='local'" in str(err.value)  # what to do instead


SETTINGS = {  # a generation setting -> two values ranks might disagree on
    "max_new_tokens": (3, 4),
    "min_new_tokens": (1, 2),
    "repetition_penalty": (1.0, 1.3),
    "do_sample": (False, True),
}


def generate_with(config, setting: str, values, **options):
    """parallelize, then generate() with `setting` = values[this rank's index, clamped]."""
    import torch
    import torch.distributed as dist

    model = parallelize_at(config, max_length=16, **options)
    value = values[min(dist.get_rank(), len(values) - 1)]
    ids = torch.full((max(options.get("dp", 1), 1), 2), 5)
    kwargs = {"max_new_tokens": 2, setting: value}
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)


@settings(max_examples=max(2, settings.default.max_examples // 2))
@given(data=st.data())
def test_ranks_that_disagree_about_generation_settings_are_refused(worlds, data):
    arch = data.draw(st.sampled_from(PARALLEL_ARCHITECTURES), label="arch")
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(meshes(config, max_world=4, min_world=2), label="mesh")  # dp=2 fits every config
    setting = data.draw(st.sampled_from(sorted(SETTINGS)), label="setting")
    values = SETTINGS[setting]  # rank 0 has the first, every other rank the second
    with pytest.raises(WorldError) as err:
        worlds(mesh.world).run(generate_with, config, setting, values, **mesh.options())
    message = str(err.value)
    assert len(err.value.tracebacks) == mesh.world  # refused before the first step, on every rank
    assert "the ranks disagree about generation settings" in message
    assert f"{setting}: rank 0 has {values[0]!r}, rank 1 has {values[1]!r}" in message

"""Errors as properties: every mesh a model cannot take is refused at `parallelize`, naming the
problem and listing the (tp, cp) it can take; a valid mesh on a world of another size is refused
with both numbers."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcompile.passes.plan import MeshError
from cpcompile.testing import WorldError
from cpcompile.testing.strategies import (
    PARALLEL_ARCHITECTURES,
    invalid_meshes,
    meshes,
    tiny_configs,
    tiny_model_from_config,
    valid_meshes_of,
)

# Refusals only capture the graph (no compile): cheap, so more examples than the equivalence tests.
CHEAP = settings(max_examples=3 * settings.default.max_examples)


def parallelize_at(config, tp, cp, combine, kv_interleave):
    from cpcompile import parallelize

    parallelize(tiny_model_from_config(config), tp=tp, cp=cp, combine=combine, kv_interleave=kv_interleave, lowering="eager")


def _expected_listing(config, mesh) -> str:
    valid = valid_meshes_of(config, max(16, mesh.world), mesh.combine)
    return f"Valid (tp, cp) for this model with combine={mesh.combine!r}: {valid}"


@CHEAP
@given(data=st.data())
def test_invalid_mesh_is_refused_listing_valid_ones(worlds, data):
    arch = data.draw(st.sampled_from(PARALLEL_ARCHITECTURES), label="arch")
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(invalid_meshes(config, max_world=8), label="mesh")
    head = f"cannot run at tp={mesh.tp}, cp={mesh.cp}, combine={mesh.combine!r}"
    if mesh.world <= 4:  # on a world of the right size, as a user would
        with pytest.raises(WorldError) as err:
            worlds(mesh.world).run(parallelize_at, config, *mesh.options().values())
        message = str(err.value)
        assert len(err.value.tracebacks) == mesh.world  # every rank refuses, none hangs
    else:  # refused before a process group is needed
        with pytest.raises(MeshError) as err:
            parallelize_at(config, *mesh.options().values())
        message = str(err.value)
    assert "MeshError" in message or isinstance(err.value, MeshError)
    assert head in message
    assert _expected_listing(config, mesh) in message


@CHEAP
@given(data=st.data())
def test_valid_mesh_on_a_world_of_another_size_is_refused(worlds, data):
    arch = data.draw(st.sampled_from(PARALLEL_ARCHITECTURES), label="arch")
    config = data.draw(tiny_configs(arch), label="config")
    mesh = data.draw(meshes(config, max_world=4, min_world=2), label="mesh")
    n = data.draw(st.sampled_from([k for k in (2, 4) if k != mesh.world]), label="world")
    if mesh.world == 1:
        return  # this config takes no mesh > 1
    pattern = re.escape(f"process group has {n} ranks but dp*tp*cp = 1*{mesh.tp}*{mesh.cp} = {mesh.world}")
    with pytest.raises(WorldError, match=pattern):
        worlds(n).run(parallelize_at, config, *mesh.options().values())

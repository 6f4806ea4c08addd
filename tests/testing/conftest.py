"""Session-wide gloo worlds (2 ranks; 4 for dp x cp) for the tests of `cpcompile.testing` (as tests/distributed)."""

import pytest

from cpcompile.testing import World


@pytest.fixture(scope="session")
def world2():
    with World(2) as world:
        yield world


@pytest.fixture(scope="session")
def world4():
    with World(4) as world:
        yield world

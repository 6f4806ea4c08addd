"""A session-wide 2-rank gloo world for the tests of `cpcompile.testing` (as tests/distributed)."""

import pytest

from cpcompile.testing import World


@pytest.fixture(scope="session")
def world2():
    with World(2) as world:
        yield world

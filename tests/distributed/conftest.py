"""Session-wide gloo worlds: `world2` and `world4` start their ranks on first use and are shared by
every test of the session (a world costs seconds to start; a test's `run` costs milliseconds).

Functions passed to `world.run` must be module-level (they are pickled by reference).
"""

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

"""Property tests of cpcompile's equivalence promise: hypothesis profiles and shared worlds.

Profiles (HYPOTHESIS_PROFILE, default `ci`):
  ci    bounded so that tests/properties runs in under 8 minutes on a 2-core CPU machine
        (dp, tp, cp up to 4 ranks in all); derandomized (the same examples every run), no
        example database, no deadline;
  deep  many more examples, randomized, by hand before a release:
        HYPOTHESIS_PROFILE=deep python -m pytest tests/properties -q

Settings are bound when a test module is imported, so the profile is loaded here, before
this directory's modules (and only for modules imported after it: the kernel tests have
their own profile, loaded by tests/kernels/conftest.py before this).
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from cpcompile.testing import World

_common = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=6, derandomize=True, **_common)
settings.register_profile("deep", max_examples=60, derandomize=False, **_common)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "deep"):
    PROFILE = "ci"  # another directory's profile name (tests/kernels): these tests stay bounded
settings.load_profile(PROFILE)


@pytest.fixture(scope="session")
def worlds(request):
    """`worlds(n)`: a gloo world of n = dp*tp*cp ranks (2, 3 or 4), started on first use and kept
    for the session (a world costs seconds to start, one example's run costs about as much as a
    compile). 2 and 4 are the suite's `world2` / `world4` (tests/conftest.py), shared with
    tests/distributed and tests/testing."""
    shared = {2: "world2", 4: "world4"}
    started: dict[int, World] = {}

    def get(n: int) -> World:
        if n in shared:
            return request.getfixturevalue(shared[n])
        if n not in started:
            started[n] = World(n).start()
        return started[n]

    yield get
    for world in started.values():
        world.close()

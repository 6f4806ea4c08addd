import glob
import os

# The Triton kernels run under the interpreter on machines without an NVIDIA device; the
# variable must be set before anything imports triton (torch._dynamo does), so the check
# looks for device nodes rather than asking torch.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Dynamo's recompile limit is per code object; the suite compiles the same HF forwards many times.
torch._dynamo.config.cache_size_limit = 64
torch._dynamo.config.accumulated_cache_size_limit = 512


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Session-wide gloo worlds: `world2` and `world4` start their ranks on first use and are shared by
# every test of the session (tests/distributed, tests/testing); a world costs seconds to start, a
# test's `run` milliseconds. Functions passed to `world.run` must be module-level (pickled by reference).
@pytest.fixture(scope="session")
def world2():
    from cpcompile.testing import World

    with World(2) as world:
        yield world


@pytest.fixture(scope="session")
def world4():
    from cpcompile.testing import World

    with World(4) as world:
        yield world

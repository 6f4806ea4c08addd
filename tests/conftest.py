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

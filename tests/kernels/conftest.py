"""Kernel tests: interpreter on CPU, real kernels on CUDA; one hypothesis profile."""

import os

import torch

# The Triton kernels run under the interpreter on CPU-only machines. Must be set before
# any @triton.jit function is defined, i.e. before cpcompile.kernels.triton_* is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Bounded example counts keep the suite (interpreter included) within a few minutes on a
# 2-core CPU; CI (CI=true) runs derandomized so failures reproduce. For a longer search:
# HYPOTHESIS_PROFILE=kernels-thorough python -m pytest tests/kernels (a debug switch).
_common = dict(
    deadline=None,
    derandomize=os.environ.get("CI", "").lower() == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("kernels", max_examples=25, **_common)
settings.register_profile("kernels-thorough", max_examples=400, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "kernels"))

def pytest_configure(config):
    # exp(x) = exp2(x * LOG2E) of HF's finfo.min bias overflows to -inf (-> weight 0, the
    # intended result); numpy under the interpreter warns about it, the GPU does not.
    config.addinivalue_line(
        "filterwarnings", "ignore:overflow encountered in multiply:RuntimeWarning:triton.runtime.interpreter"
    )

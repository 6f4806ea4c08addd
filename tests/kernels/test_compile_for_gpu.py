"""The Triton kernels compile for Hopper (sm_90) as the launcher would launch them.

The CPU suite runs the kernels under the interpreter, which never applies the compiler's
rules: until this test, a module-level ``NEG_INF: tl.constexpr = ...`` passed every
interpreted test and would have failed every launch on a GPU. ``compile_for_gpu.py`` runs
Triton's whole compiler (and ptxas) for sm_90 on the launcher's own arguments, in a process
without TRITON_INTERPRET, and fails a kernel whose shared memory exceeds Hopper's 227 KiB per
block (the MLA tiles at Dk=576/Dv=512 are the ones near it).
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(__file__)


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold compile: a cached kernel would not be checked
    root = os.path.dirname(os.path.dirname(HERE))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compile_for_gpu.py"), "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    ok_lines = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    # 10 attention cases (3 of them MLA: Dk=576 as 512 + 64, Dv=512, 128 heads on one KV head);
    # merge_states: the split merges (HAS_L) of five of them and 2 cases of its own
    assert sum("attention_split_kernel" in line for line in ok_lines) == 10, out
    assert sum("merge_states_kernel" in line for line in ok_lines) == 7, out
    mla = [line for line in ok_lines if "attention_split_kernel" in line and "MLA" in line]
    assert len(mla) == 3 and all("'num_warps': 8, 'num_stages': 2" in line for line in mla), out

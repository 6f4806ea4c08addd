"""Compile the Triton kernels for an NVIDIA target without a GPU, exactly as the launcher
would launch them: Triton's front end, its MLIR passes and ptxas all run; only the launch
does not.

    python tests/kernels/compile_for_gpu.py            # sm_90 (Hopper), every case below
    python tests/kernels/compile_for_gpu.py --arch 80  # another compute capability

The interpreter (``TRITON_INTERPRET=1``, what the CPU suite runs) executes a kernel's Python
body and never sees the compiler's rules: a module-level ``x: tl.constexpr = 1.0`` runs there
and is refused by the compiler, which would fail every launch on a GPU. This script runs the
launchers on CPU tensors with the kernels' ``[grid](...)`` replaced by a recorder, then
compiles each recorded launch for the target from the same arguments, specialised by
Triton's own launch binder: pointer dtypes, 32- or 64-bit integers, integers equal to 1 made
constexpr and 16-divisible ones marked so (what lets a load vectorise and pipeline), the
constexprs and the options are those a real launch would compile. Must run in a process
where TRITON_INTERPRET is unset (tests/kernels/test_compile_for_gpu.py starts one).

Prints one line per compiled kernel with its shared memory (Triton's figure) and registers
and spill stores per thread (ptxas -v); a kernel whose shared memory exceeds what one block
may use on the target fails, as its launch would. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: the compiler is what is checked"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from cpcompile.kernels import triton_launch  # noqa: E402

_OPTIONS = ("num_warps", "num_stages", "num_ctas")
# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability.
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, grid, args, kwargs))


class _Kernels:
    def __init__(self, module, launches):
        self._module, self._launches = module, launches

    def __getattr__(self, name):
        return _Recorder(getattr(self._module, name), self._launches)


def specialize(fn, args, kwargs, backend):
    """(signature, constexprs, attrs, options) as ``fn[grid](*args, **kwargs)`` would compile
    them: Triton's own binder and argument packing (triton/runtime/jit.py), without a device."""
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    _, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    missing = [n for n in fn.arg_names if n not in bound]
    assert not missing, f"{fn.__name__}: launcher passed no value for {missing}"
    return sig, constexprs, attrs, {k: v for k, v in kwargs.items() if k in _OPTIONS}


def compile_with_ptxas_log(src, target, options):
    """triton.compile, plus (registers, spill-store bytes) per thread from ptxas -v."""
    buf, triton.knobs.nvidia.dump_ptxas_log = io.StringIO(), True  # Triton prints ptxas's log
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=target, options=options)
    finally:
        triton.knobs.nvidia.dump_ptxas_log = False
    log = buf.getvalue()
    regs, spills = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    return k, int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else -1


def record(call):
    """Run ``call()`` with the Triton kernels recorded instead of launched; returns the launches."""
    launches = []
    real_tk, real_interpreted = triton_launch._tk, triton_launch._interpreted
    triton_launch._tk, triton_launch._interpreted = _Kernels(real_tk, launches), lambda: False
    try:
        call()
    finally:
        triton_launch._tk, triton_launch._interpreted = real_tk, real_interpreted
    return launches


def cases():
    """(name, call): every constexpr of both kernels takes each of its values at least once."""
    from kernel_testing import make_case

    def attn(dtype, Dk=128, Dv=128, G=4, Lq=1, S=4096, mask=None, softcap=0.0, filled=False, Hkv=2,
             v_view_of_k=False, **kw):
        c = make_case(B=2, Hkv=Hkv, G=G, Lq=Lq, S=S, Dk=Dk, Dv=Dv, dtype=dtype, mask=mask, softcap=softcap,
                      device="cpu")
        if v_view_of_k:  # MLA's joint latent cache: k = kv, v = kv[..., :Dv]
            c.v = c.k[..., :Dv]
        args = list(c.args())
        if filled:
            args[9] = torch.full((2,), S // 2, dtype=torch.int64)
        return lambda: triton_launch.attention_with_lse(*args, **kw)

    yield "decode bf16 D=128, split merge", attn(torch.bfloat16)
    yield "decode bf16 D=128, one split, filled", attn(torch.bfloat16, S=128, filled=True)
    yield "decode fp16 D=256 (BLOCK_N 32)", attn(torch.float16, Dk=256, Dv=256)
    yield "decode fp32 (ieee dot) D=64", attn(torch.float32, Dk=64, Dv=64)
    yield "prefill bf16 Lq=64, bool mask", attn(torch.bfloat16, Lq=64, S=256, mask="bool")
    yield "prefill bf16 Lq=16, additive mask, softcap", attn(torch.bfloat16, Lq=16, S=256, mask="additive", softcap=30.0)
    yield "decode bf16 Dk=192 Dv=128 (K tail)", attn(torch.bfloat16, Dk=192, Dv=128, G=16)
    # MLA (DeepSeek absorbed): 128 query heads on one KV head, Dk = 512 + 64, v a view of k
    mla = dict(Dk=576, Dv=512, G=128, Hkv=1, S=32768)
    yield "MLA decode bf16 Dk=576 Dv=512 Hq=128, V from K, split merge", attn(torch.bfloat16, v_view_of_k=True, **mla)
    yield "MLA decode bf16 Dk=576 Dv=512 Hq=128, separate V", attn(torch.bfloat16, **mla)
    yield "MLA prefill bf16 Lq=4, V from K, one split", attn(torch.bfloat16, v_view_of_k=True, **{**mla, "Lq": 4})

    def merge(dtype, R=4, D=128):
        o = torch.randn(R, 2, 8, 1, D, dtype=dtype)
        lse = torch.randn(R, 2, 8, 1)
        return lambda: triton_launch.merge_states(o, lse)

    yield "merge_states bf16 D=128", merge(torch.bfloat16)
    yield "merge_states fp32 D=512", merge(torch.float32, D=512)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    backend = make_backend(target)
    max_shared = MAX_SHARED.get(args.arch)
    failed = compiled = 0
    seen = set()
    for name, call in cases():
        for fn, _grid, a, kw in record(call):
            sig, constexprs, attrs, options = specialize(fn, a, kw, backend)
            key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
                   tuple(sorted((k, str(v)) for k, v in attrs.items())), tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            t0 = time.perf_counter()
            try:
                k, regs, spills = compile_with_ptxas_log(ASTSource(fn, sig, constexprs, attrs), target, options)
                if max_shared is not None and k.metadata.shared > max_shared:
                    raise RuntimeError(f"shared memory {k.metadata.shared} B > {max_shared} B per block on sm_{args.arch}: "
                                       f"the launch would fail (OutOfResources); use smaller tiles or fewer stages")
                compiled += 1
                print(f"ok    sm_{args.arch} {fn.__name__:<24} {name}: {time.perf_counter() - t0:.1f} s, "
                      f"shared memory {k.metadata.shared} B, {regs} registers, {spills} B spill stores, "
                      f"{options}")
            except Exception as e:  # report every failing variant, not only the first
                failed += 1
                msg = "".join(traceback.format_exception_only(e)).strip()
                print(f"FAIL  sm_{args.arch} {fn.__name__:<24} {name}\n{msg[-2500:]}")
    print(f"triton {triton.__version__}: {compiled} kernel variants compiled for sm_{args.arch}, {failed} failed")
    return 1 if failed or not compiled else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())

"""Sweep the Triton decode kernel's launch parameters on a GPU: which BLOCK_N, num_warps and
num_stages stream the KV cache closest to copy bandwidth.

    python benchmarks/tune_attention.py --json tune.json          # CUDA, about a minute
    TRITON_INTERPRET=1 python benchmarks/tune_attention.py --device cpu   # smoke test, tiny shapes

GQA sweep: each configuration runs ``attention_with_lse`` (Lq=1, bf16, Hkv=8, D=128) on three
decode shapes: one long row (B=1, S=128K), a batch (B=8, S=32K) and a wide batch of short rows
(B=32, S=8K). MLA sweep: DeepSeek's absorbed attention, Hq=128 on one KV head, Dk=576
(512 + 64), Dv=512, v a view of k, S=32K, B 1/8 -- BLOCK_N 16/32/64 x num_stages at 8 warps,
then the launcher's tiles with other split counts (the split count is capped by the traffic
of the split states, see triton_launch.state_split_cap). Every result is checked against an
fp32 reference before it is timed (max |diff| under the bf16 tolerance the kernel tests use,
relative to max |ref|); a configuration that fails, or does not compile (registers, shared
memory), is reported as such and never ranked. Times are CUDA-event medians; %copy is the
bytes the op must move (GQA: K+V+Q+O; MLA: the joint KV cache, read once) over the
device-to-device copy bandwidth measured in the same run. The launcher's own choice
(``auto``) is the first row of each sweep, so the table says how far the heuristic is from
the best configuration on this device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_attention import copy_bandwidth, time_ops  # noqa: E402

from cpcompile.kernels import triton_launch  # noqa: E402

SHAPES = [(1, 32, 128 * 1024), (8, 32, 32 * 1024), (32, 32, 8 * 1024)]  # (B, Hq, S), Hkv=8, D=128
MLA_SHAPES = [(1, 128, 32 * 1024), (8, 128, 32 * 1024)]  # (B, Hq, S), Hkv=1, Dk=576, Dv=512
MLA_DK, MLA_DV = 576, 512
BF16_TOL = 2e-2  # |o - ref| / max|ref| for bf16 outputs: a few bf16 ulps


def gqa_inputs(shapes, dev):
    inputs = []
    for B, Hq, S in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, Hq, 1, 128, dtype=torch.bfloat16, device=dev, generator=g)
        k = torch.randn(B, 8, S, 128, dtype=torch.bfloat16, device=dev, generator=g)
        v = torch.randn(B, 8, S, 128, dtype=torch.bfloat16, device=dev, generator=g)
        pos_q = torch.full((B, 1), S, device=dev)
        pos_kv = torch.arange(S, device=dev).expand(B, S)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=1 / math.sqrt(128), enable_gqa=True)
        nbytes = (k.numel() + v.numel() + 2 * q.numel()) * 2
        inputs.append(((B, Hq, S), (q, k, v, pos_q, pos_kv, 1 / math.sqrt(128)), ref, nbytes))
    return inputs


def mla_inputs(shapes, dev):
    """Joint latent cache kv [B, 1, S, 576]: k = kv, v = kv[..., :512] (the kernel reads V from K's tile)."""
    inputs = []
    for B, Hq, S in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, Hq, 1, MLA_DK, dtype=torch.bfloat16, device=dev, generator=g)
        kv = torch.randn(B, 1, S, MLA_DK, dtype=torch.bfloat16, device=dev, generator=g)
        pos_q = torch.full((B, 1), S, device=dev)
        pos_kv = torch.arange(S, device=dev).expand(B, S)
        scale = 1 / math.sqrt(MLA_DK)
        k32 = kv.float()  # [B, 1, S, Dk]; the KV head broadcasts over the Hq query heads
        ref = torch.softmax(q.float() @ k32.transpose(-1, -2) * scale, dim=-1) @ k32[..., :MLA_DV]
        del k32
        inputs.append(((B, Hq, S), (q, kv, kv[..., :MLA_DV], pos_q, pos_kv, scale), ref, kv.numel() * 2))
    return inputs


_SHORT = dict(block_n="N", num_warps="w", num_stages="st", num_splits="splits")


def sweep(title, inputs, configs, dev, args, copy_bw) -> list[dict]:
    shapes = [shape for shape, *_ in inputs]
    print(f"# {title}")
    head = f"{'config':<28}" + "".join(f"{f'B={B} S={S / 1024:g}K':>16}" for (B, _, S) in shapes) + f"{'worst':>8}"
    print(head)
    print("-" * len(head))
    results = []
    for cfg in configs:
        name = "auto" if not cfg else " ".join(f"{_SHORT[k]}={v}" for k, v in cfg.items())
        row = dict(config=name, **cfg, shapes=[])
        cells = []
        try:
            for shape, a, ref, nbytes in inputs:
                fn = lambda: triton_launch.attention_with_lse(*a, **cfg)  # noqa: E731
                err = ((fn()[0].float() - ref).abs().max() / ref.abs().max()).item()
                if not err <= BF16_TOL:
                    row["error"] = f"max |diff| / max |ref| {err:.2e} vs fp32 at {shape}"
                    break
                (t,) = time_ops([fn], dev, args.warmup, args.iters)
                frac = nbytes / t / copy_bw
                row["shapes"].append(dict(B=shape[0], Hq=shape[1], S=shape[2], seconds=t, fraction_of_copy_bw=frac,
                                          max_rel_diff=err))
                cells.append(f"{t * 1e6:7.0f}us {frac:5.0%}")
        except Exception as e:  # a config that does not compile (registers, shared memory) is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if "error" in row:
            print(f"{name:<28}  {row['error']}")
        else:
            row["worst_fraction"] = min(s["fraction_of_copy_bw"] for s in row["shapes"])
            print(f"{name:<28}" + "".join(f"{c:>16}" for c in cells) + f"{row['worst_fraction']:>8.0%}")
        results.append(row)
        if dev == "cuda":
            torch.cuda.empty_cache()
    ranked = sorted((r for r in results if "worst_fraction" in r), key=lambda r: -r["worst_fraction"])
    if ranked:
        print(f"# best by worst-shape fraction: {ranked[0]['config']} ({ranked[0]['worst_fraction']:.0%}); "
              f"auto: {results[0].get('worst_fraction', float('nan')):.0%}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the interpreter on tiny shapes, to check this script (TRITON_INTERPRET=1)")
    ap.add_argument("--sweep", choices=["all", "gqa", "mla"], default="all")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("tune_attention: needs a CUDA device (the Triton kernels run compiled only there)")
        return 2
    copy_bw = copy_bandwidth(dev, 2 << 30 if dev == "cuda" else 64 << 20, args.warmup, args.iters)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (interpreter)"
    print(f"# {name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read+write)")

    results = mla_results = []
    if args.sweep in ("all", "gqa"):
        configs = [dict()] + [dict(block_n=n, num_warps=w, num_stages=st)
                              for n, w, st in itertools.product((32, 64, 128), (4, 8), (2, 3))]
        shapes = SHAPES if dev == "cuda" else [(1, 32, 1024), (2, 32, 512)]
        results = sweep("GQA decode: Hkv=8, D=128, bf16", gqa_inputs(shapes, dev),
                        configs if dev == "cuda" else configs[:3], dev, args, copy_bw)
    if args.sweep in ("all", "mla"):
        # 8 warps: the [64, 512] fp32 accumulator is 128 registers per thread (256 over 4 warps).
        # BLOCK_N 64 with 3 stages would need ~290 KiB of shared memory: left out. Each tile
        # config is a compile of a few seconds; the step has 30 s (gpu_check.sh).
        configs = [dict()] + [dict(block_n=n, num_warps=8, num_stages=st) for n, st in [(16, 2), (32, 1), (32, 3), (64, 2)]]
        configs += [dict(num_splits=n) for n in (8, 34, 66)]  # auto gives 17 at S=32K (state-traffic cap)
        shapes = MLA_SHAPES if dev == "cuda" else [(1, 16, 256)]
        mla_results = sweep(f"MLA decode: Hq=128 (CPU: 16), Hkv=1, Dk={MLA_DK}, Dv={MLA_DV}, v = kv[..., :Dv], bf16",
                            mla_inputs(shapes, dev), configs if dev == "cuda" else configs[:2] + configs[-1:],
                            dev, args, copy_bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, copy_bw=copy_bw,
                           results=results, mla_results=mla_results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode attention benchmark: torch.ops.cpcompile.attention_with_lse vs PyTorch SDPA.

    python benchmarks/bench_attention.py                 # CUDA if available, else CPU
    python benchmarks/bench_attention.py --device cpu --json out.json
    python benchmarks/bench_attention.py --table filled  # only the filled-fraction table
    python benchmarks/bench_attention.py --table mla     # only the MLA decode table

CUDA: Lq=1, bf16, Hkv=8, Hq 32/64, D=128, B 1/8/32, local S 4K..128K (shapes that do not
fit in memory are skipped). Each op is timed with CUDA events after warm-up (median of
--iters). Achieved bandwidth counts the bytes the op must move, K+V+Q+O, and is compared
with the device's copy bandwidth measured in the same run (a large device-to-device copy,
timed the same way, counting read + write). Target: >= 85% of copy bandwidth for S >= 32K.

CPU: the pure-torch path on the same shapes scaled down (B 1/4, S 1K..8K, fp32), wall
clock (median of --iters), beside SDPA and the host's memcpy bandwidth. Under a minute.
Ours and SDPA are timed interleaved, so their ratio holds up on a shared, loaded machine.

Filled table (``filled``: a static cache whose first n slots are written): decode on one
cache of S = 128K slots (CPU: 8K, fp32), Hq=32, Hkv=8, D=128, B 1/8 (CPU: 1), with
filled = 1%, 10%, 100% of S, timed interleaved with the same call without ``filled`` (all S
slots read). Bytes count only what must be read and written for the filled slots (K+V of
n slots + Q + O), so %copy shows whether a short live context still streams at full
bandwidth, and t/t(all) whether the cost follows the live context rather than S.

MLA table (DeepSeek's absorbed latent attention): decode, Hq=128 query heads on one KV head,
Dk=576 (512 latent + 64 rope), Dv=512, v a view of k (one joint cache kv [B, 1, S, 576]),
S=32K, B 1/8/32, bf16 (CPU: the torch path, fp32, S=4K, B 1). Bytes are the KV read, S*576
elements per batch row (Q and O add < 1%), against the copy bandwidth. Beside it, the same
call with v a separate tensor (K and V both read: the cost of not reusing K's tile as V) and
the max |o - ref| relative to max |ref|, ref an fp32 torch computation.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

import cpcompile  # noqa: F401  (registers torch.ops.cpcompile.*)

TARGET_FRACTION = 0.85  # of copy bandwidth, for S >= TARGET_MIN_S
TARGET_MIN_S = 32 * 1024


def time_ops(fns, device: str, warmup: int, iters: int) -> list[float]:
    """Median seconds per call of each fn. Calls are interleaved (a, b, a, b, ...) so that
    ops compared in one row see the same machine load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    if device == "cuda":
        torch.cuda.synchronize()
    for _ in range(iters):
        for fn, ts in zip(fns, times):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def copy_bandwidth(device: str, nbytes: int, warmup: int, iters: int) -> float:
    """Bytes/s of a large copy (read + write), timed like the ops."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    (t,) = time_ops([lambda: dst.copy_(src)], device, warmup, iters)
    return 2 * nbytes / t


def fits(device: str, nbytes: int) -> bool:
    if device != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info()
    return nbytes < 0.7 * free


def bench_shape(device, dtype, B, Hq, Hkv, S, D, warmup, iters):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device, generator=g)
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device, generator=g)
    v = torch.randn(B, Hkv, S, D, dtype=dtype, device=device, generator=g)
    pos_q = torch.full((B, 1), S, device=device)  # the new token; every slot is visible
    pos_kv = torch.arange(S, device=device).expand(B, S)
    scale = 1.0 / math.sqrt(D)

    def ours():
        return torch.ops.cpcompile.attention_with_lse(q, k, v, pos_q, pos_kv, scale)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    try:
        err = (ours()[0].float() - sdpa().float()).abs().max().item()
        t_ours, t_sdpa = time_ops([ours, sdpa], device, warmup, iters)
    except torch.OutOfMemoryError:  # SDPA's working set; time ours alone
        (t_ours,), t_sdpa, err = time_ops([ours], device, warmup, iters), float("nan"), float("nan")
    nbytes = (k.numel() + v.numel() + 2 * q.numel()) * k.element_size()  # K + V + Q + O
    return dict(B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, dtype=str(dtype).removeprefix("torch."),
                ours_s=t_ours, sdpa_s=t_sdpa, bytes=nbytes, ours_bytes_per_s=nbytes / t_ours,
                max_abs_diff_vs_sdpa=err)


def shapes_table(device, dtype, Bs, Ss, warmup, iters, copy_bw) -> list[dict]:
    header = f"{'B':>3} {'Hq':>3} {'S':>7} {'ours':>10} {'GB/s':>8} {'%copy':>6} {'sdpa':>10} {'sdpa/ours':>9} {'maxdiff':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for Hq in (32, 64):
        for B in Bs:
            for S in Ss:
                kv_bytes = 2 * B * 8 * S * 128 * torch.finfo(dtype).bits // 8
                if not fits(device, 3 * kv_bytes):  # K, V, and room for SDPA's working set
                    print(f"{B:>3} {Hq:>3} {S:>7}  skipped: {kv_bytes / 2**30:.1f} GiB of KV does not fit")
                    continue
                r = bench_shape(device, dtype, B, Hq, 8, S, 128, warmup, iters)
                r["fraction_of_copy_bw"] = r["ours_bytes_per_s"] / copy_bw
                rows.append(r)
                print(f"{B:>3} {Hq:>3} {S:>7} {r['ours_s'] * 1e3:>8.3f}ms {r['ours_bytes_per_s'] / 1e9:>8.1f} "
                      f"{100 * r['fraction_of_copy_bw']:>5.1f}% {r['sdpa_s'] * 1e3:>8.3f}ms "
                      f"{r['sdpa_s'] / r['ours_s']:>9.2f} {r['max_abs_diff_vs_sdpa']:>8.1e}")
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


FILLED_FRACTIONS = (0.01, 0.10, 1.0)


def bench_filled(device, dtype, B, Hq, Hkv, S, D, warmup, iters):
    """One S-slot cache, ``filled`` at each of FILLED_FRACTIONS, vs reading all S slots."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device, generator=g)
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device, generator=g)
    v = torch.randn(B, Hkv, S, D, dtype=dtype, device=device, generator=g)
    pos_q = torch.full((B, 1), S, device=device)  # the new token: every slot would be visible
    pos_kv = torch.arange(S, device=device).expand(B, S)
    scale = 1.0 / math.sqrt(D)
    ns = [max(1, round(f * S)) for f in FILLED_FRACTIONS]
    filled = [torch.full((B,), n, dtype=torch.int32, device=device) for n in ns]

    def call(f=None):
        return lambda: torch.ops.cpcompile.attention_with_lse(q, k, v, pos_q, pos_kv, scale, 0.0, 0, None, f)

    times = time_ops([call()] + [call(f) for f in filled], device, warmup, iters)
    t_all, rows = times[0], []
    for frac, n, f, t in zip(FILLED_FRACTIONS, ns, filled, times[1:]):
        # Same answer as attention over the n-slot prefix alone.
        o_prefix = torch.ops.cpcompile.attention_with_lse(q, k[:, :, :n], v[:, :, :n], pos_q, pos_kv[:, :n], scale)[0]
        err = (call(f)()[0].float() - o_prefix.float()).abs().max().item()
        nbytes = (2 * B * Hkv * n * D + 2 * q.numel()) * k.element_size()  # K + V of n slots + Q + O
        rows.append(dict(B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, dtype=str(dtype).removeprefix("torch."),
                         filled_fraction=frac, filled=n, ours_s=t, all_slots_s=t_all, bytes=nbytes,
                         ours_bytes_per_s=nbytes / t, time_vs_all_slots=t / t_all,
                         max_abs_diff_vs_prefix=err))
    return rows


def filled_table(device, dtype, Bs, S, warmup, iters, copy_bw) -> list[dict]:
    print()
    print(f"# filled: one cache of S={S} slots, only the first n = filled slots written; "
          f"bytes = K+V of n slots + Q + O; t/t(all) vs the same call reading all S slots")
    header = (f"{'B':>3} {'Hq':>3} {'filled':>7} {'n':>7} {'ours':>10} {'MB read':>9} {'GB/s':>8} "
              f"{'%copy':>6} {'t(all)':>10} {'t/t(all)':>8} {'maxdiff':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for B in Bs:
        kv_bytes = 2 * B * 8 * S * 128 * torch.finfo(dtype).bits // 8
        if not fits(device, kv_bytes):
            print(f"{B:>3}  32  skipped: {kv_bytes / 2**30:.1f} GiB of KV does not fit")
            continue
        for r in bench_filled(device, dtype, B, 32, 8, S, 128, warmup, iters):
            r["fraction_of_copy_bw"] = r["ours_bytes_per_s"] / copy_bw
            rows.append(r)
            print(f"{B:>3} {r['Hq']:>3} {100 * r['filled_fraction']:>6.0f}% {r['filled']:>7} "
                  f"{r['ours_s'] * 1e3:>8.3f}ms {r['bytes'] / 1e6:>9.2f} {r['ours_bytes_per_s'] / 1e9:>8.1f} "
                  f"{100 * r['fraction_of_copy_bw']:>5.1f}% {r['all_slots_s'] * 1e3:>8.3f}ms "
                  f"{r['time_vs_all_slots']:>8.3f} {r['max_abs_diff_vs_prefix']:>8.1e}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


MLA = dict(Hq=128, Hkv=1, Dk=576, Dv=512)  # DeepSeek-V2/V3 absorbed attention at decode


def bench_mla(device, dtype, B, S, warmup, iters):
    """MLA decode on a joint latent cache kv [B, 1, S, Dk]: k = kv, v = kv[..., :Dv]."""
    Hq, Dk, Dv = MLA["Hq"], MLA["Dk"], MLA["Dv"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, 1, Dk, dtype=dtype, device=device, generator=g)
    kv = torch.randn(B, 1, S, Dk, dtype=dtype, device=device, generator=g)
    v_sep = kv[..., :Dv].clone()  # same values, own storage: K and V read separately
    pos_q = torch.full((B, 1), S, device=device)
    pos_kv = torch.arange(S, device=device).expand(B, S)
    scale = 1.0 / math.sqrt(Dk)

    def call(v):
        return lambda: torch.ops.cpcompile.attention_with_lse(q, kv, v, pos_q, pos_kv, scale)

    o = call(kv[..., :Dv])()[0].float()
    err = 0.0
    for b in range(B):  # fp32 reference, one batch row at a time; kv's head dim broadcasts over Hq
        k32 = kv[b].float()  # [1, S, Dk]
        o_ref = torch.softmax(q[b].float() @ k32.transpose(-1, -2) * scale, dim=-1) @ k32[..., :Dv]
        err = max(err, ((o[b] - o_ref).abs().max() / o_ref.abs().max()).item())
    t, t_sep = time_ops([call(kv[..., :Dv]), call(v_sep)], device, warmup, iters)
    nbytes = B * S * Dk * kv.element_size()  # the joint cache, read once
    return dict(B=B, S=S, **MLA, dtype=str(dtype).removeprefix("torch."), ours_s=t, separate_v_s=t_sep,
                bytes=nbytes, ours_bytes_per_s=nbytes / t, max_rel_diff_vs_fp32=err)


def mla_table(device, dtype, Bs, S, warmup, iters, copy_bw) -> list[dict]:
    print()
    print(f"# MLA decode: Hq={MLA['Hq']}, Hkv={MLA['Hkv']}, Dk={MLA['Dk']}, Dv={MLA['Dv']}, v = kv[..., :Dv], S={S}; "
          f"bytes = the KV read ({MLA['Dk']} elements per slot); sep V: v a separate tensor")
    header = f"{'B':>3} {'S':>7} {'ours':>10} {'MB read':>9} {'GB/s':>8} {'%copy':>6} {'sep V':>10} {'reldiff':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for B in Bs:
        kv_bytes = B * S * MLA["Dk"] * torch.finfo(dtype).bits // 8
        if not fits(device, 6 * kv_bytes):  # kv, the separate V, and the fp32 reference's copy
            print(f"{B:>3} {S:>7}  skipped: {kv_bytes / 2**30:.1f} GiB of KV does not fit")
            continue
        r = bench_mla(device, dtype, B, S, warmup, iters)
        r["fraction_of_copy_bw"] = r["ours_bytes_per_s"] / copy_bw
        rows.append(r)
        print(f"{B:>3} {S:>7} {r['ours_s'] * 1e3:>8.3f}ms {r['bytes'] / 1e6:>9.1f} {r['ours_bytes_per_s'] / 1e9:>8.1f} "
              f"{100 * r['fraction_of_copy_bw']:>5.1f}% {r['separate_v_s'] * 1e3:>8.3f}ms {r['max_rel_diff_vs_fp32']:>8.1e}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per op (median)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--table", choices=["all", "shapes", "filled", "mla"], default="all",
                    help="shapes: the S sweep; filled: the filled-fraction table; mla: MLA decode; all: the three")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    if device == "cuda":
        dtype, Bs, Ss = torch.bfloat16, (1, 8, 32), [4096 * 2**i for i in range(6)]  # 4K..128K
        filled_Bs, filled_S = (1, 8), 128 * 1024
        mla_Bs, mla_S = (1, 8, 32), 32 * 1024
        warmup, iters = args.warmup or 10, args.iters or 50
        copy_bytes, name = 2 << 30, torch.cuda.get_device_name()
    else:
        dtype, Bs, Ss = torch.float32, (1, 4), [1024 * 2**i for i in range(4)]  # 1K..8K
        filled_Bs, filled_S = (1,), 8 * 1024
        mla_Bs, mla_S = (1,), 4 * 1024
        warmup, iters = args.warmup or 2, args.iters or 7
        copy_bytes, name = 256 << 20, f"CPU ({torch.get_num_threads()} threads)"
    copy_bw = copy_bandwidth(device, copy_bytes, warmup, iters)

    print(f"# attention_with_lse decode benchmark on {device.upper()}: {name}; torch {torch.__version__}")
    shapes = "" if args.table == "mla" else ", Hkv=8, D=128"  # the MLA table states its own
    print(f"# Lq=1, {str(dtype).removeprefix('torch.')}{shapes}; copy bandwidth {copy_bw / 1e9:.1f} GB/s"
          f" (read+write, {copy_bytes >> 20} MiB); median of {iters} after {warmup} warm-up")
    rows = []
    if args.table in ("all", "shapes"):
        rows = shapes_table(device, dtype, Bs, Ss, warmup, iters, copy_bw)

    filled_rows = []
    if args.table in ("all", "filled"):
        filled_rows = filled_table(device, dtype, filled_Bs, filled_S, warmup, iters, copy_bw)

    mla_rows = []
    if args.table in ("all", "mla"):
        mla_rows = mla_table(device, dtype, mla_Bs, mla_S, warmup, iters, copy_bw)

    summary = {}
    if device == "cuda" and rows:
        long = [r for r in rows if r["S"] >= TARGET_MIN_S]
        worst = min((r["fraction_of_copy_bw"] for r in long), default=float("nan"))
        met = bool(long) and worst >= TARGET_FRACTION
        summary = dict(target_fraction=TARGET_FRACTION, target_min_S=TARGET_MIN_S, worst_fraction=worst, met=met)
        print(f"# target >= {TARGET_FRACTION:.0%} of copy bandwidth for S >= {TARGET_MIN_S // 1024}K: "
              f"{'MET' if met else 'NOT MET'} (worst {worst:.1%})")
    elif device != "cuda":
        print("# CPU: the pure-torch path (Triton runs only on CUDA); %copy is against host memcpy")
    if filled_rows:
        by_frac = {fr: [r for r in filled_rows if r["filled_fraction"] == fr] for fr in FILLED_FRACTIONS}
        summary["filled"] = {
            f"{fr:g}": dict(worst_fraction_of_copy_bw=min(r["fraction_of_copy_bw"] for r in rs),
                            worst_time_vs_all_slots=max(r["time_vs_all_slots"] for r in rs))
            for fr, rs in by_frac.items() if rs
        }
        print("# filled: " + "; ".join(
            f"{100 * float(fr):g}% -> worst {s['worst_fraction_of_copy_bw']:.1%} of copy bw, "
            f"<= {s['worst_time_vs_all_slots']:.3f} x t(all)" for fr, s in summary["filled"].items()))
    if mla_rows:
        summary["mla"] = dict(worst_fraction_of_copy_bw=min(r["fraction_of_copy_bw"] for r in mla_rows),
                              worst_rel_diff=max(r["max_rel_diff_vs_fp32"] for r in mla_rows))
        print(f"# MLA: worst {summary['mla']['worst_fraction_of_copy_bw']:.1%} of copy bw (KV bytes), "
              f"worst relative diff vs fp32 {summary['mla']['worst_rel_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, device_name=name, torch=torch.__version__, dtype=str(dtype),
                           copy_bytes_per_s=copy_bw, rows=rows, filled_rows=filled_rows, mla_rows=mla_rows,
                           summary=summary), f, indent=1)


if __name__ == "__main__":
    main()

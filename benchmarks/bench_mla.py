"""MLA under cpcompile: KV bytes per rank, combine bytes per decode step, W_UV before/after the exchange.

    python benchmarks/bench_mla.py                       # all three tables (about 3 minutes on 2 cores)
    python benchmarks/bench_mla.py --json benchmarks/results/mla.json
    python benchmarks/bench_decode.py --arch mla --batch 1 --prompt 2040 --steps 8   # decode time (separate)

1. KV bytes per token per layer per rank at DeepSeek-V3's dims (H=128, kv_lora_rank R=512, rope Dr=64,
   qk_nope Dn=128, v Dv=128, bf16), for several (tp, cp): cpcompile's joint latent buffer, allocated
   by `cpcompile.KVCache` itself on the meta device (sink slot included, 32k tokens), against the
   expanded per-head layout (H*(Dn+Dr+Dv) per token: what attention over expanded K/V reads) and
   HF's own cache (the latent, whole on every rank), and the ideal 1/(tp*cp) of one device.
2. Combine bytes per layer per decode step, read off the decode graphs compiled on gloo ranks
   (`PassReport.counts["collective_bytes"]`) for small DeepSeek-shaped configs at several
   contexts, heads and kv_lora_rank, against Helix's formula: the all-to-all carries every head's
   partial output and its LSE, `B*H*(R + 1)` fp32 values (`B*H*(Dv + 1)` with W_UV before the
   exchange), the same for every context.
3. W_UV before or after the exchange (`parallelize(mla_uv=...)`), at DeepSeek-V3's dims per rank and
   decode step: bytes exchanged against W_UV weight bytes read and FLOPs; and decode ms/token of
   both on gloo (CPU; latency-bound, so only the direction of the byte saving is meaningful here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from _machine import cpu_model

DSV3 = dict(H=128, R=512, Dr=64, Dn=128, Dv=128, bytes=2)  # DeepSeek-V3, bf16
MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4), (8, 1), (4, 2), (2, 4)]


def kv_table(context: int = 32768) -> list[dict]:
    from cpcompile import KVCache

    d, rows = DSV3, []
    latent = (d["R"] + d["Dr"]) * d["bytes"]
    expanded = d["H"] * (d["Dn"] + d["Dr"] + d["Dv"]) * d["bytes"]
    for tp, cp in MESHES:
        n = tp * cp
        per_rank = []
        for r in range(n):  # every rank's cache: the slots split as the interleave rule gives them
            cache = KVCache(1, context, cp=cp, cp_rank=r % cp, tp=tp, tp_rank=r // cp, latent={0})
            cache.allocate_shapes([(1, d["R"], d["Dr"], torch.bfloat16)], 1, torch.device("meta"))
            per_rank.append(cache.kv_bytes() / context)
        rows.append(dict(tp=tp, cp=cp, cpcompile=max(per_rank), ideal=latent / n, hf_latent=latent, expanded=expanded,
                         vs_ideal=max(per_rank) / (latent / n)))
    return rows


def run_rank(cfg: dict, tp: int, cp: int, context: int, steps: int, mla_uv: str) -> dict:
    """On every rank: a DeepSeek-shaped model, parallelized; prefill `context` tokens, time `steps` decode steps."""
    import transformers

    from cpcompile import parallelize

    config = transformers.DeepseekV3Config(
        vocab_size=1024, hidden_size=cfg["hidden"], intermediate_size=4 * cfg["hidden"], num_hidden_layers=2,
        num_attention_heads=cfg["H"], num_key_value_heads=cfg["H"], kv_lora_rank=cfg["R"], q_lora_rank=None,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=cfg["Dv"], first_k_dense_replace=2,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    parallelize(model, tp=tp, cp=cp, mla_uv=mla_uv, max_length=context + steps + 8, prefill_chunk=context,
                max_batch=1, lowering="eager", verify=False)
    ids = torch.randint(3, 1000, (1, context), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, times = out.past_key_values, []
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
            nxt = out.logits[:, -1:].argmax(-1)
    decode = model._cpcompile.backend.reports[-1].counts
    return dict(bytes=decode["collective_bytes"], count=decode["collectives"], ms=1e3 * statistics.median(times[1:]))


def combine_table(world4) -> list[dict]:
    rows = []
    base = dict(hidden=256, H=16, R=128, Dv=32)
    variants = [("base", base, 128), ("base", base, 1024), ("2x heads", {**base, "H": 32}, 128),
                ("2x kv_lora_rank", {**base, "R": 256}, 128)]
    for mla_uv in ("after", "before"):
        for name, cfg, context in variants:
            if mla_uv == "before" and name != "base":
                continue
            res = world4.run(run_rank, cfg, 2, 2, context, 4, mla_uv)[0]
            width = cfg["R"] if mla_uv == "after" else cfg["Dv"]
            formula = 1 * cfg["H"] * (width + 1) * 4  # B=1, fp32: o and the bit-cast lse, per layer
            measured = res["bytes"]["all_to_all"] / 2  # 2 layers
            rows.append(dict(variant=name, mla_uv=mla_uv, context=context, H=cfg["H"], R=cfg["R"], Dv=cfg["Dv"],
                             measured=measured, formula=formula, all_to_all=res["count"]["all_to_all"], ms=res["ms"]))
    return rows


def uv_table() -> list[dict]:
    d, rows = DSV3, []
    for tp, cp in ((2, 2), (4, 2), (8, 1)):
        n = tp * cp
        for b in (1, 16, 64):
            after = dict(exchange=b * d["H"] * (d["R"] + 2) * d["bytes"], weight=d["H"] // n * d["R"] * d["Dv"] * d["bytes"],
                         flops=2 * b * d["H"] // n * d["R"] * d["Dv"])
            before = dict(exchange=b * d["H"] * (d["Dv"] + 2) * d["bytes"], weight=d["H"] * d["R"] * d["Dv"] * d["bytes"],
                          flops=2 * b * d["H"] * d["R"] * d["Dv"])
            rows.append(dict(tp=tp, cp=cp, B=b, after=after, before=before))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="")
    p.add_argument("--skip-world", action="store_true", help="tables 1 and 3 only (no gloo ranks)")
    a = p.parse_args(argv)
    print(f"MLA benchmark -- CPU ({cpu_model()}, {os.cpu_count()} cores), torch {torch.__version__}, python {platform.python_version()}")
    out = {"kv": kv_table(), "uv": uv_table()}

    print("\n1. KV bytes per token per layer per rank, DeepSeek-V3 dims (bf16; KVCache on meta, 32k tokens, sink included)")
    print(f"{'tp x cp':<8}| {'cpcompile':>10} | {'ideal 1/(tp*cp)':>15} | {'vs ideal':>8} | {'HF latent (each rank)':>21} | {'expanded per-head':>17}")
    for r in out["kv"]:
        print(f"{r['tp']}x{r['cp']:<6}| {r['cpcompile']:>10.1f} | {r['ideal']:>15.1f} | {r['vs_ideal']:>7.4f}x | "
              f"{r['hf_latent']:>21} | {r['expanded']:>17}")

    if not a.skip_world:
        from cpcompile.testing import World

        with World(4) as world:
            out["combine"] = combine_table(world)
        print("\n2. all-to-all bytes per layer per decode step, tp2 x cp2, batch 1, fp32 (measured on the compiled graph)")
        print(f"{'variant':<17}| {'mla_uv':<6} | {'context':>7} | {'H':>3} | {'R':>4} | {'measured':>8} | {'Helix formula':>13} | {'a2a/step':>8} | {'ms/token':>8}")
        for r in out["combine"]:
            print(f"{r['variant']:<17}| {r['mla_uv']:<6} | {r['context']:>7} | {r['H']:>3} | {r['R']:>4} | {r['measured']:>8.0f} | "
                  f"{r['formula']:>13} | {r['all_to_all']:>8} | {r['ms']:>8.2f}")

    print("\n3. W_UV after vs before the exchange, DeepSeek-V3 dims, bf16, per rank per layer per decode step")
    print(f"{'tp x cp':<8}| {'B':>3} | {'exchange after':>14} | {'before':>8} | {'W_UV bytes after':>16} | {'before':>9} | "
          f"{'MFLOP after':>11} | {'before':>7}")
    for r in out["uv"]:
        print(f"{r['tp']}x{r['cp']:<6}| {r['B']:>3} | {r['after']['exchange']:>14} | {r['before']['exchange']:>8} | "
              f"{r['after']['weight']:>16} | {r['before']['weight']:>9} | {r['after']['flops'] / 1e6:>11.1f} | {r['before']['flops'] / 1e6:>7.1f}")

    if a.json:
        out.update(cpu=cpu_model(), torch=torch.__version__, command=" ".join([os.path.basename(sys.executable)] + sys.argv))
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

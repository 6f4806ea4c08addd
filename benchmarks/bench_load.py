"""Loading benchmark: per-rank peak memory and time of sharded loading against every rank loading everything.

    python benchmarks/bench_load.py                         # ~1.5B Llama-shaped model, bf16, 4 ranks tp2 x cp2
    python benchmarks/bench_load.py --layers 2 --hidden 512 --intermediate 1024 --vocab 4096   # a quick run
    python benchmarks/bench_load.py --json benchmarks/results/load.json

A Llama-shaped config (default hidden 2048, 22 layers, 16 query / 8 KV heads of 128, intermediate
8192, vocab 32000, untied head: 1.51B parameters, 3.0 GB in bf16) gets seeded random weights and is
saved once as sharded safetensors (`--shard-size`, default 1GB) in a temporary directory; the parent
then frees it. Each path then runs on a fresh gloo world of 4 ranks (`cpcompile.testing.World`; new
processes, so one path's peak cannot hide in the other's), every rank with one intra-op thread:

  * sharded: `cpcompile.from_pretrained(path, tp=2, cp=2)`: parameters on meta, capture on meta,
    the twin's self-verification, then each rank reads its shards and the replicated parameters;
  * eager: `AutoModelForCausalLM.from_pretrained(path)` on every rank (the whole model), then
    `cpcompile.parallelize(model, tp=2, cp=2)` (which verifies against the whole model it holds);

then one `generate()` (a batch of 2, 8-token prompts, `--new-tokens` greedy tokens). Both use
`--lowering` (default aot_eager: the memory and time of loading, not of Inductor's compiles).

Per rank: the resident set before anything (the worker's imports), the peak resident set after
loading + parallelize and after the first `generate()` (`ru_maxrss`: it counts every page the
process touched, file-backed ones included, so a whole-file mmap would show), the seconds each
phase took, and for the sharded path the bytes read from the files (`Checkpoint.bytes_read`)
against the rank's own shard bytes. The goal: peak per rank <= 1/4 of the model + a fixed overhead,
stated as the process baseline (imports) + the parameters this version still replicates (embedding,
LM head, norms: `replicated` below; the vocab-parallel issue shards the first two) + FIXED_MIB for
tracing, compiling and running (what a model of a few MiB of weights takes: 191 MiB measured with
`--layers 2 --hidden 512 --intermediate 1024 --vocab 4096 --heads 8 --kv-heads 4`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))


FIXED_MIB = 256


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(a):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def save_model(a, path: str) -> int:
    """Seeded random weights in bf16, saved sharded; returns the parameter count."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(a), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=a.shard_size)
    del model
    return n


PROMPT = [[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]]
MASK = [[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]


def run_rank(path: str, how: str, mesh: dict, lowering: str, new_tokens: int, max_length: int) -> dict:
    import transformers

    import cpcompile
    from cpcompile.parallelize import weight_bytes

    out = {"baseline_mb": _rss_mb()}
    t0 = time.perf_counter()
    if how == "sharded":
        model = cpcompile.from_pretrained(path, **mesh, lowering=lowering, max_length=max_length)
        out["bytes_read"] = model._cpcompile.checkpoint.bytes_read
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        out["hf_load_s"] = time.perf_counter() - t0
        out["after_hf_load_peak_mb"] = _peak_mb()
        model = cpcompile.parallelize(model, **mesh, lowering=lowering, max_length=max_length)
    out["load_parallelize_s"] = time.perf_counter() - t0
    out["after_parallelize_peak_mb"] = _peak_mb()
    out["weight_bytes"] = weight_bytes(model)
    st = model._cpcompile
    out["shard_bytes"] = sum(w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
                             for w, b in st.parallel.local.values())
    t1 = time.perf_counter()
    ids = model.generate(torch.tensor(PROMPT), attention_mask=torch.tensor(MASK), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    out["generate_s"] = time.perf_counter() - t1
    out["after_generate_peak_mb"] = _peak_mb()
    out["tokens"] = ids.tolist()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", default="1GB")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--lowering", default="aot_eager")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--paths", default="sharded,eager")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from cpcompile.testing import World
    from _machine import cpu_model

    mesh = dict(tp=a.tp, cp=a.cp)
    n = a.tp * a.cp
    tmp = tempfile.mkdtemp(prefix="cpcompile-bench-load-")
    try:
        t = time.perf_counter()
        params = save_model(a, tmp)
        files = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
        model_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
        print(f"model: {params / 1e9:.3f}B parameters, {model_bytes / 1e9:.3f} GB in {len(files)} safetensors files "
              f"(saved in {time.perf_counter() - t:.0f} s); {n} gloo ranks, tp={a.tp} x cp={a.cp}, lowering={a.lowering}; "
              f"{cpu_model()}, {os.cpu_count()} cores")
        replicated = 2 * a.vocab * a.hidden * 2 + (2 * a.layers + 1) * a.hidden * 2  # embed + head + norms, bf16
        results = {}
        for how in a.paths.split(","):
            with World(n) as world:
                results[how] = world.run(run_rank, tmp, how, mesh, a.lowering, a.new_tokens, 64, timeout_s=3600)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mb = 1 / 2**20
    quarter = model_bytes / n * mb
    print(f"\n1/{n} of the model: {quarter:.0f} MiB; replicated in this version (embedding, LM head, norms): "
          f"{replicated * mb:.0f} MiB; fixed overhead allowed: {FIXED_MIB} MiB\n")
    print("| path | rank | baseline MiB | peak after load+parallelize MiB | peak after 1st generate MiB | "
          "load+parallelize s | generate s | bytes read | own shards + replicated | goal: peak - baseline <= 1/n + replicated + fixed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    goal_met = True
    for how, per in results.items():
        for r, x in enumerate(per):
            peak = x["after_generate_peak_mb"]
            read = x.get("bytes_read")
            own = x["shard_bytes"] + replicated
            ok = peak - x["baseline_mb"] <= quarter + replicated * mb + FIXED_MIB
            if how == "sharded":
                goal_met &= ok
            print(f"| {how} | {r} | {x['baseline_mb']:.0f} | {x['after_parallelize_peak_mb']:.0f} | {peak:.0f} | "
                  f"{x['load_parallelize_s']:.1f} | {x['generate_s']:.1f} | "
                  f"{f'{read / 1e6:.1f} MB' if read is not None else 'whole model'} | {own / 1e6:.1f} MB | "
                  f"{'MET' if ok else 'NOT MET'} ({peak - x['baseline_mb']:.0f} MiB) |")
    if len(results) == 2:
        s, e = results["sharded"], results["eager"]
        same = all(x["tokens"] == s[0]["tokens"] for x in s + e)
        ratio_peak = max(x["after_generate_peak_mb"] for x in e) / max(x["after_generate_peak_mb"] for x in s)
        ratio_t = max(x["load_parallelize_s"] for x in e) / max(x["load_parallelize_s"] for x in s)
        print(f"\nsharded vs eager, same run: peak RSS per rank {ratio_peak:.2f}x lower; load+parallelize "
              f"{ratio_t:.2f}x {'faster' if ratio_t >= 1 else 'slower'}; tokens identical on every rank and path: {same}")
    print(f"goal (sharded): {'MET' if goal_met else 'NOT MET'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cpu=cpu_model(), cores=os.cpu_count(), args=vars(a), params=params, model_bytes=model_bytes,
                           replicated_bytes=replicated, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

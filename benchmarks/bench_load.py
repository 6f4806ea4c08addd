"""Loading benchmark: per-rank peak memory and time of sharded loading against every rank loading everything.

    python benchmarks/bench_load.py                         # ~1.5B Llama-shaped model, bf16, 4 ranks, tp2 x cp2 and tp4
    python benchmarks/bench_load.py --layers 2 --hidden 512 --intermediate 1024 --vocab 4096 --heads 8 --kv-heads 4
    python benchmarks/bench_load.py --json benchmarks/results/load.json

A Llama-shaped config (default hidden 2048, 22 layers, 16 query / 8 KV heads of 128, intermediate
8192, vocab 32000, untied head: 1.51B parameters, 3.0 GB in bf16) gets seeded random weights and is
saved once as sharded safetensors (`--shard-size`, default 1GB) in a temporary directory; the parent
then frees it. Every run below is a fresh gloo world of 4 ranks (`cpcompile.testing.World`: new
processes, so one run's peak cannot hide in another's), one intra-op thread per rank:

  * sharded, per mesh (`--meshes`, default 2x2 and 4x1 as TPxCP): `cpcompile.from_pretrained(path,
    tp=, cp=)`: parameters on meta, capture on meta, the twin's self-verification, then each rank
    reads its shards and the replicated parameters;
  * eager, at the first mesh: `AutoModelForCausalLM.from_pretrained(path)` on every rank (the whole
    model), then `cpcompile.parallelize(model, tp=, cp=)` (verifying against the whole model it holds);
  * narrow, per mesh: the sharded path on a model of the same depth, heads and mesh but narrow widths
    (hidden 16 x heads, intermediate 128, vocab 512): what tracing, compiling and running cost
    beside the weights ("overhead" below);

each followed by one `generate()` (a batch of 2, 8-token prompts, `--new-tokens` greedy tokens), with
`--lowering` (default aot_eager: the memory and time of loading, not of Inductor's compiles).

Per rank: the resident set before anything (the worker's imports), the peak resident set after
loading + parallelize and after the first `generate()` (`ru_maxrss`, which counts every page the
process touched, file-backed ones included), the seconds of each phase, the bytes read from the
files (`Checkpoint.bytes_read`) and the rank's own weights (`parallelize.weight_bytes`). The goal:
peak - baseline - overhead <= 1/4 of the model + the parameters this version still replicates
(embedding, LM head, norms; the vocab-parallel issue shards the first two). Under tp2 x cp2 the
q/k/v projections are column-parallel over TP only (each CP rank of a TP group attends with all of
that group's heads, Helix's layout), so a rank's own weights there exceed 1/4 by design; tp4 shows
the 1/4 split.
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
    from cpcompile.sharding import weight_bytes

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
                             for w, b in st.weights.local.values())
    t1 = time.perf_counter()
    ids = model.generate(torch.tensor(PROMPT), attention_mask=torch.tensor(MASK), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    out["generate_s"] = time.perf_counter() - t1
    out["after_generate_peak_mb"] = _peak_mb()
    out["tokens"] = ids.tolist()
    return out


def _mesh(text: str) -> dict:
    tp, cp = (int(x) for x in text.split("x"))
    return dict(tp=tp, cp=cp)


def _run(world_size: int, path: str, how: str, mesh: dict, a) -> list[dict]:
    from cpcompile.testing import World

    with World(world_size) as world:  # fresh processes: one run's peak cannot hide in another's
        return world.run(run_rank, path, how, mesh, a.lowering, a.new_tokens, 64, timeout_s=3600)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", default="1GB")
    ap.add_argument("--meshes", default="2x2,4x1", help="TPxCP, comma-separated; the eager path runs at the first")
    ap.add_argument("--lowering", default="aot_eager")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from _machine import cpu_model

    meshes = [m for m in a.meshes.split(",") if m]
    n = 4
    for m in meshes:
        if _mesh(m)["tp"] * _mesh(m)["cp"] != n:
            ap.error(f"--meshes: {m} is not {n} ranks")
    narrow = argparse.Namespace(**{**vars(a), "hidden": 16 * a.heads, "intermediate": 32 * n, "vocab": 512})
    tmp, tmp_narrow = tempfile.mkdtemp(prefix="cpcompile-bench-load-"), tempfile.mkdtemp(prefix="cpcompile-bench-load-")
    runs: dict[str, list[dict]] = {}
    try:
        t = time.perf_counter()
        params = save_model(a, tmp)
        save_model(narrow, tmp_narrow)
        files = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
        model_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
        print(f"model: {params / 1e9:.3f}B parameters, {model_bytes / 1e9:.3f} GB in {len(files)} safetensors files "
              f"(saved in {time.perf_counter() - t:.0f} s); {n} gloo ranks, lowering={a.lowering}; "
              f"{cpu_model()}, {os.cpu_count()} cores")
        for m in meshes:
            runs[f"narrow {m}"] = _run(n, tmp_narrow, "sharded", _mesh(m), narrow)
            runs[f"sharded {m}"] = _run(n, tmp, "sharded", _mesh(m), a)
        if not a.no_eager:
            runs[f"eager {meshes[0]}"] = _run(n, tmp, "eager", _mesh(meshes[0]), a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp_narrow, ignore_errors=True)

    mib = 1 / 2**20
    replicated = (2 * a.vocab * a.hidden + (2 * a.layers + 1) * a.hidden) * 2  # embedding, head, norms (bf16)
    nreplicated = (2 * narrow.vocab * narrow.hidden + (2 * a.layers + 1) * narrow.hidden) * 2
    print(f"\nwhole model {model_bytes * mib:.0f} MiB; 1/{n} of it {model_bytes / n * mib:.0f} MiB; replicated in this "
          f"version (embedding, LM head, norms) {replicated * mib:.0f} MiB")
    print("overhead = peak - baseline - own weights of the narrow model (same depth and mesh, hidden "
          f"{narrow.hidden}, intermediate {narrow.intermediate}, vocab {narrow.vocab}): tracing, compiling, running\n")
    print("| run | rank | baseline MiB | peak after load+parallelize MiB | peak after 1st generate MiB | "
          "load+parallelize s | 1st generate s | read from files MiB | own weights MiB | peak - baseline - overhead MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    overhead = {}
    summary = {}
    for name, per in runs.items():
        how, m = name.split()
        for r, x in enumerate(per):
            own = x["weight_bytes"]
            if how == "narrow":
                overhead[(m, r)] = x["after_generate_peak_mb"] - x["baseline_mb"] - own * mib
            residual = x["after_generate_peak_mb"] - x["baseline_mb"] - overhead[(m, r)]
            x["residual_mb"], x["overhead_mb"] = residual, overhead[(m, r)]
            read = x.get("bytes_read")
            print(f"| {name} | {r} | {x['baseline_mb']:.0f} | {x['after_parallelize_peak_mb']:.0f} | "
                  f"{x['after_generate_peak_mb']:.0f} | {x['load_parallelize_s']:.1f} | {x['generate_s']:.1f} | "
                  f"{f'{read * mib:.0f}' if read is not None else 'whole model'} | {own * mib:.0f} | "
                  f"{residual:.0f} (overhead {overhead[(m, r)]:.0f}) |")
        if how != "narrow":
            summary[name] = dict(
                peak=max(x["after_generate_peak_mb"] for x in per), residual=max(x["residual_mb"] for x in per),
                own=max(x["weight_bytes"] for x in per) * mib, load_s=max(x["load_parallelize_s"] for x in per),
                tokens=[x["tokens"] for x in per],
            )
    print()
    quarter = model_bytes / n * mib
    for name, x in summary.items():
        if name.startswith("sharded"):
            goal = quarter + replicated * mib
            print(f"{name}: peak - baseline - overhead {x['residual']:.0f} MiB per rank (max), own weights {x['own']:.0f} MiB; "
                  f"goal <= 1/{n} of the model + the replicated parameters = {goal:.0f} MiB: "
                  f"{'MET' if x['residual'] <= goal else 'NOT MET'}")
    eager = [k for k in summary if k.startswith("eager")]
    if eager:
        e, s = summary[eager[0]], summary["sharded " + eager[0].split()[1]]
        same = all(t == e["tokens"][0] for x in summary.values() for t in x["tokens"])
        print(f"sharded vs eager at {eager[0].split()[1]}, same run: peak RSS per rank {e['peak'] / s['peak']:.2f}x lower "
              f"({s['peak']:.0f} vs {e['peak']:.0f} MiB); load+parallelize {e['load_s'] / s['load_s']:.2f}x "
              f"({s['load_s']:.0f} vs {e['load_s']:.0f} s); greedy tokens identical on every rank, mesh and path: {same}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cpu=cpu_model(), cores=os.cpu_count(), args=vars(a), params=params, model_bytes=model_bytes,
                           replicated_bytes=replicated, narrow_replicated_bytes=nreplicated, runs=runs), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

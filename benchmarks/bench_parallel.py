"""Parallel decode benchmark on CPU: per-rank memory, collectives and step time for tp x cp meshes.

    python benchmarks/bench_parallel.py                               # defaults (see below)
    python benchmarks/bench_parallel.py --meshes 1x2,2x2 --contexts 256 --json /tmp/par.json
    python benchmarks/bench_parallel.py --lowering eager             # eager / aot_eager / inductor

A small Llama (seeded random weights, fp32, eval; default 2 layers, hidden 256, 8 heads, 2 KV
heads, intermediate 512, vocab 1024) is run with `cpcompile.parallelize(model, tp=, cp=, ...)` on
every rank of a gloo world of tp*cp ranks (`cpcompile.testing.World`, one persistent world per
world size, each started once; every rank runs with one intra-op thread). For each mesh
(default 1x1 1x2 2x1 2x2 1x4, written TPxCP) and context length (default 256 and 1024), with
batch 2 and `max_length = context + steps + 8`:

  * prefill: one forward of the whole prompt (`logits_to_keep=1`), greedy next token;
  * decode: step-by-step forwards of 1 token per row (2D mask padded to max_length, greedy),
    `--warmup` untimed steps (the first one compiles the decode graph), `--steps` timed steps
    (`time.perf_counter` around forward + argmax on each rank; a step's time is the slowest
    rank's; the number reported is the median over the timed steps), then `--profiled` steps
    under `torch.profiler` (separately, so the profiler's overhead is not in the timings).

Measured per mesh and context:

  * per-rank KV bytes (`KVCache.kv_bytes()` of the cache the wrapper installed) and weight bytes
    (`cpcompile.parallelize.weight_bytes`), as fractions of the 1x1 run's;
  * collectives and bytes per layer per decode step, statically from the decode graph's pass
    report (`collectives` / `collective_bytes` divided by the number of layers), and at run time
    from the profiler: `_c10d_functional::*` events (the collectives the compiled graph issued),
    and `gloo:*` events (what the gloo backend executed, graph or not). Collectives executed
    outside the graph (the wrapper's per-call input checksum) are reported separately, per step;
  * decode time per token against the single-device (1x1) cpcompile run, as a ratio;
  * the greedy tokens of every rank against the 1x1 run's.

Goals printed with MET / NOT MET: per-rank KV within one interleave block of 1/cp of the single
device's per TP shard; decode bytes moved per step independent of context length.
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

KINDS = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter")
SHORT = {"all_reduce": "AR", "all_to_all": "A2A", "all_gather": "AG", "reduce_scatter": "RS"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--meshes", default="1x1,1x2,2x1,2x2,1x4", help="comma list of TPxCP (1x1 is always run: it is the reference)")
    p.add_argument("--contexts", default="256,1024", help="comma list of prompt lengths")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps (the first compiles the decode graph)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps")
    p.add_argument("--profiled", type=int, default=4, help="decode steps under torch.profiler, after the timed ones")
    p.add_argument("--combine", default="all_to_all", choices=["all_to_all", "ag_rs", "all_gather"])
    p.add_argument("--kv-interleave", type=int, default=1)
    p.add_argument("--lowering", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one mesh x context may take before its world is torn down")
    p.add_argument("--json", metavar="PATH", default="")
    a = p.parse_args(argv)
    a.mesh_list = []
    for m in a.meshes.split(","):
        tp, cp = (int(x) for x in m.lower().split("x"))
        a.mesh_list.append((tp, cp))
    if (1, 1) not in a.mesh_list:
        a.mesh_list.insert(0, (1, 1))
    a.context_list = [int(c) for c in a.contexts.split(",")]
    return a


# ----------------------------------------------------------------------------- on every rank


def build_model(a: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=a["vocab"],
        hidden_size=a["hidden"],
        intermediate_size=a["intermediate"],
        num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"],
        num_key_value_heads=a["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(a["seed"])
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _kind_of(name: str) -> str | None:
    """Profiler event name -> collective kind (None for anything else)."""
    n = name.lower().replace("allgather", "all_gather").replace("allreduce", "all_reduce").replace("alltoall", "all_to_all")
    n = n.replace("reducescatter", "reduce_scatter").replace("reduce_scatter_tensor", "reduce_scatter")
    for k in KINDS:
        if k in n:
            return k
    return None


def profile_counts(prof, dtype_size: int) -> dict:
    """Collectives in a profile: graph-issued (`_c10d_functional::*`, bytes from input shapes x
    the model's element size), gloo-executed (`gloo:*`), and every event name that looked like a
    collective (for the record)."""
    graph = {k: 0 for k in KINDS}
    graph_bytes = {k: 0 for k in KINDS}
    gloo = {k: 0 for k in KINDS}
    names: dict[str, int] = {}
    for e in prof.events():
        kind = _kind_of(e.name)
        if kind is None and "wait_tensor" not in e.name:
            continue
        names[e.name] = names.get(e.name, 0) + 1
        if kind is None:
            continue
        if e.name.startswith("_c10d_functional::"):
            graph[kind] += 1
            shp = e.input_shapes[0] if e.input_shapes else []
            numel = 1
            for d in shp:
                numel *= d
            graph_bytes[kind] += numel * dtype_size
        elif e.name.startswith("gloo:"):
            gloo[kind] += 1
    return dict(graph=graph, graph_bytes=graph_bytes, gloo=gloo, names=names)


def bench_rank(a: dict, tp: int, cp: int, ctx: int) -> dict:
    """One mesh x context on this rank: prefill, decode steps (timed, then profiled)."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from cpcompile import parallelize
    from cpcompile.parallelize import weight_bytes

    rank = dist.get_rank() if dist.is_initialized() else 0
    model = build_model(a)
    n_steps = a["warmup"] + a["steps"] + a["profiled"]
    L = ctx + n_steps + 8
    B = a["batch"]
    t0 = time.perf_counter()
    parallelize(model, tp=tp, cp=cp, combine=a["combine"], kv_interleave=a["kv_interleave"], max_length=L, lowering=a["lowering"])
    setup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(a["seed"] + 1)
    prompt = torch.randint(0, a["vocab"], (B, ctx), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    mask[:, :ctx] = 1
    tokens, gaps, times = [], [], []
    reports = model._cpcompile.backend.reports

    def step(ids, cache, i):
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        top2 = logits.topk(2, dim=-1).values
        gaps.append((top2[:, 0] - top2[:, 1]).min().item())
        tokens.append(nxt)
        return nxt, out.past_key_values

    with torch.no_grad():
        t0 = time.perf_counter()
        nxt, cache = step(prompt, None, -1)  # prefill (compiles the prefill graph)
        prefill_compile_s = time.perf_counter() - t0
        graphs_after_prefill = len(reports)
        i = 0
        t0 = time.perf_counter()
        for _ in range(a["warmup"]):
            mask[:, ctx + i] = 1
            nxt, cache = step(nxt, cache, i)
            i += 1
        warmup_s = time.perf_counter() - t0
        graphs_before_timed = len(reports)
        for _ in range(a["steps"]):
            mask[:, ctx + i] = 1
            if dist.is_initialized():
                dist.barrier()  # every rank starts the step together (not timed)
            t1 = time.perf_counter()
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t1)
            cache = out.past_key_values
            top2 = logits.topk(2, dim=-1).values
            gaps.append((top2[:, 0] - top2[:, 1]).min().item())
            tokens.append(nxt)
            i += 1
        prof_counts = None
        if a["profiled"]:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(a["profiled"]):
                    mask[:, ctx + i] = 1
                    nxt, cache = step(nxt, cache, i)
                    i += 1
            prof_counts = profile_counts(prof, torch.finfo(torch.float32).bits // 8)
        recompiles = len(reports) - graphs_before_timed
    decode = reports[-1].counts
    layer0 = cache.layers[0]
    return dict(
        rank=rank,
        tp=tp,
        cp=cp,
        ctx=ctx,
        max_length=L,
        setup_s=setup_s,
        compile_s=prefill_compile_s + warmup_s,
        graphs=len(reports),
        graphs_after_prefill=graphs_after_prefill,
        recompiles=recompiles,
        kv_bytes=cache.kv_bytes(),
        kv_heads=(layer0.num_heads, layer0.global_heads),
        local_slots=cache.layout.local_slots,
        weight_bytes=weight_bytes(model),
        collectives=dict(decode.get("collectives", {})),
        collective_bytes=dict(decode.get("collective_bytes", {})),
        profile=prof_counts,
        times=times,
        tokens=torch.cat(tokens, dim=1),
        gaps=gaps,
    )


# ----------------------------------------------------------------------------- parent


def _fmt_counts(c: dict, div: float) -> str:
    parts = [f"{SHORT[k]}{c.get(k, 0) / div:g}" for k in KINDS if c.get(k, 0)]
    return " ".join(parts) if parts else "-"


def _fmt_bytes(b: float) -> str:
    return f"{b / 1024:.2f}K" if b else "0"


def main(argv=None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_parallel  # the workers unpickle bench_rank by reference to this module
    import transformers

    from cpcompile.testing import World, WorldError

    ad = {k: v for k, v in vars(a).items() if k not in ("mesh_list", "context_list")}
    print(f"CPU parallel decode benchmark -- device: CPU ({cpu_model()}, {os.cpu_count()} logical cores), "
          f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, gloo")
    print(f"model: Llama layers={a.layers} hidden={a.hidden} intermediate={a.intermediate} heads={a.heads} "
          f"kv_heads={a.kv_heads} vocab={a.vocab} fp32 | batch={a.batch} contexts={a.context_list} "
          f"| lowering={a.lowering} combine={a.combine} kv_interleave={a.kv_interleave} "
          f"| {a.warmup} warmup + {a.steps} timed + {a.profiled} profiled decode steps")
    ncores = os.cpu_count() or 1
    print(f"NOTE: {ncores} cores, 1 thread per rank: meshes with more than {ncores} ranks share cores, so their "
          "time per token measures overheads (collectives, scheduling), not speed-up.")
    try:
        print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes on this machine also compete for the cores)")
    except OSError:
        pass

    worlds: dict[int, World] = {}
    results: dict[tuple, dict] = {}
    t_start = time.perf_counter()
    try:
        for ctx in a.context_list:
            for tp, cp in a.mesh_list:
                n = tp * cp
                key = (tp, cp, ctx)
                t0 = time.perf_counter()
                try:
                    if n not in worlds:
                        worlds[n] = World(n)
                    per_rank = worlds[n].run(bench_parallel.bench_rank, ad, tp, cp, ctx, timeout_s=a.timeout)
                    results[key] = dict(ok=True, ranks=per_rank)
                    status = "ok"
                except WorldError as e:
                    tbs = getattr(e, "tracebacks", {}) or {}
                    err = _last_error_line(next(iter(tbs.values()))) if tbs else str(e).splitlines()[0]
                    results[key] = dict(ok=False, error=err, detail=str(e))
                    status = f"FAILED: {err}"
                print(f"  {tp}x{cp} ctx {ctx}: {time.perf_counter() - t0:6.1f} s  {status}", flush=True)
    finally:
        for w in worlds.values():
            w.close()
    total_s = time.perf_counter() - t_start
    table, summary = report(a, results)
    print()
    print(table)
    print(summary)
    print(f"(total wall time {total_s:.0f} s)")
    if a.json:
        out = {
            "device": "CPU",
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "args": ad,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "total_s": total_s,
            "rows": _json_rows(a, results),
        }
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {a.json}")
    return 0


def _last_error_line(tb: str) -> str:
    lines = [l for l in tb.strip().splitlines() if l.strip()]
    # the exception line(s): after the last "File ..." frame, skipping torch's hints
    for l in reversed(lines):
        if l.startswith(("Set TORCHDYNAMO_VERBOSE", "You can suppress", "import torch._dynamo")):
            continue
        if ":" in l and not l.startswith(" "):
            return l.strip()
    return lines[-1].strip() if lines else "?"


def _row_metrics(a, results, tp, cp, ctx) -> dict | None:
    r = results.get((tp, cp, ctx))
    ref = results.get((1, 1, ctx))
    if r is None or not r["ok"]:
        return None
    ranks = r["ranks"]
    r0 = ranks[0]
    layers = a.layers
    m = dict(tp=tp, cp=cp, ctx=ctx, max_length=r0["max_length"])
    m["kv_bytes"] = max(x["kv_bytes"] for x in ranks)
    m["weight_bytes"] = max(x["weight_bytes"] for x in ranks)
    steps = list(zip(*[x["times"] for x in ranks]))
    m["step_s"] = [max(s) for s in steps]
    m["ms"] = 1e3 * statistics.median(m["step_s"]) if steps else float("nan")
    m["ms_min"] = 1e3 * min(m["step_s"]) if steps else float("nan")
    m["compile_s"] = max(x["setup_s"] + x["compile_s"] for x in ranks)
    m["recompiles"] = max(x["recompiles"] for x in ranks)
    m["graphs"] = r0["graphs"]
    m["static_counts"] = {k: r0["collectives"].get(k, 0) / layers for k in KINDS}
    m["static_bytes"] = sum(r0["collective_bytes"].get(k, 0) for k in KINDS) / layers
    m["static_bytes_by_kind"] = {k: r0["collective_bytes"].get(k, 0) / layers for k in KINDS}
    p = r0["profile"]
    if p is not None:
        ns = a.profiled
        m["rt_counts"] = {k: p["graph"][k] / (ns * layers) for k in KINDS}
        m["rt_bytes"] = sum(p["graph_bytes"].values()) / (ns * layers)
        m["gloo_counts"] = {k: p["gloo"][k] / ns for k in KINDS}  # per step, all layers + outside the graph
        m["outside_per_step"] = {k: (p["gloo"][k] - p["graph"][k]) / ns for k in KINDS}
        m["profile_names"] = p["names"]
    m["kv_heads"] = r0["kv_heads"]
    m["local_slots"] = r0["local_slots"]
    if ref is not None and ref["ok"]:
        rr = ref["ranks"][0]
        m["kv_frac"] = m["kv_bytes"] / rr["kv_bytes"]
        m["w_frac"] = m["weight_bytes"] / rr["weight_bytes"]
        ref_ms = 1e3 * statistics.median(rr["times"])
        m["vs_1x1"] = m["ms"] / ref_ms
        bad = [x["rank"] for x in ranks if not torch.equal(x["tokens"], rr["tokens"])]
        m["mismatch_ranks"] = bad
        m["ref_min_gap"] = min(rr["gaps"])
        if bad:
            x = ranks[bad[0]]
            d = (x["tokens"] != rr["tokens"]).nonzero()
            m["first_mismatch"] = dict(rank=bad[0], row=int(d[0, 0]), step=int(d[0, 1]), n=int(len(d)))
        # goal 1: per-rank KV slots (sink excluded) within one interleave block of max_length / cp,
        # at this rank's share of the KV heads
        h_local, h_global = m["kv_heads"]
        single_slots = rr["local_slots"] + 1  # the single device's buffers: max_length + the sink slot
        per_slot = rr["kv_bytes"] * (h_local / h_global) / single_slots
        rank_slots = m["kv_bytes"] / per_slot - 1
        ideal = r0["max_length"] / cp
        m["kv_slots_measured"] = rank_slots
        m["kv_slots_ideal"] = ideal
        m["kv_goal"] = rank_slots <= ideal + a.kv_interleave + 1e-9
    return m


def report(a, results) -> tuple[str, str]:
    hdr = (f"{'mesh':<5}|{'ctx':>5} |{'KV/rank':>9} |{'KV frac':>8} |{'W frac':>7} |{'graph coll/layer/step':>22} "
           f"|{'graph B/layer':>13} |{'run-time coll/layer/step':>25} |{'run-time B/layer':>16} |{'outside/step':>12} "
           f"|{'ms/token':>9} |{'min ms':>7} |{'vs 1x1':>7} | tokens")
    lines = [f"decode, batch {a.batch} x 1 token per step, CPU, lowering={a.lowering}; TPxCP mesh, KV/weight fractions "
             "and times vs the 1x1 cpcompile run at the same context", hdr, "-" * len(hdr)]
    rows, notes = [], []
    for ctx in a.context_list:
        for tp, cp in a.mesh_list:
            mesh = f"{tp}x{cp}"
            r = results.get((tp, cp, ctx))
            if r is None:
                continue
            if not r["ok"]:
                lines.append(f"{mesh:<5}|{ctx:>5} | FAILED: {r['error']}")
                continue
            m = _row_metrics(a, results, tp, cp, ctx)
            rows.append(m)
            rt = _fmt_counts(m["rt_counts"], 1) if "rt_counts" in m else "n/a"
            rtb = _fmt_bytes(m["rt_bytes"]) if "rt_bytes" in m else "n/a"
            outside = _fmt_counts(m["outside_per_step"], 1) if "outside_per_step" in m else "n/a"
            if "mismatch_ranks" not in m:
                tok = "no 1x1 ref"
            elif m["mismatch_ranks"]:
                tok = f"MISMATCH ranks {m['mismatch_ranks']} {m['first_mismatch']}"
            else:
                tok = "match"
            kvf = f"{m['kv_frac']:.3f}" if "kv_frac" in m else "n/a"
            wf = f"{m['w_frac']:.3f}" if "w_frac" in m else "n/a"
            vs = f"{m['vs_1x1']:.2f}x" if "vs_1x1" in m else "n/a"
            lines.append(
                f"{mesh:<5}|{ctx:>5} |{m['kv_bytes'] / 1024:>8.1f}K |{kvf:>8} |{wf:>7} |{_fmt_counts(m['static_counts'], 1):>22} "
                f"|{_fmt_bytes(m['static_bytes']):>13} |{rt:>25} |{rtb:>16} |{outside:>12} |{m['ms']:>9.2f} |{m['ms_min']:>7.2f} |{vs:>7} | {tok}"
            )
            if m["recompiles"]:
                notes.append(f"{mesh} ctx {ctx}: {m['recompiles']} graph(s) compiled during the timed/profiled steps (shapes not static?)")
            if "rt_counts" in m and sum(m["static_counts"].values()) and not sum(m["rt_counts"].values()):
                notes.append(f"{mesh} ctx {ctx}: the profiler saw no _c10d_functional collective events in the compiled "
                             f"decode graph (gloo events per step: {_fmt_counts(m['gloo_counts'], 1)}); run-time columns are blind here")
            elif "rt_counts" in m and (m["rt_counts"] != m["static_counts"] or abs(m["rt_bytes"] - m["static_bytes"]) > 0.5):
                notes.append(f"{mesh} ctx {ctx}: run-time collectives differ from the graph's: run-time "
                             f"{_fmt_counts(m['rt_counts'], 1)} / {m['rt_bytes']:.0f} B vs graph "
                             f"{_fmt_counts(m['static_counts'], 1)} / {m['static_bytes']:.0f} B per layer per step")
    lines.append("")
    lines.append("columns: KV/rank = KVCache.kv_bytes() of one rank (sink slot included); KV frac, W frac = per-rank KV / "
                 "weight bytes over the 1x1 run's; graph coll/layer/step, graph B/layer = the decode graph's pass report "
                 "(collectives, bytes sent per graph run) / layers; run-time = _c10d_functional events the profiler "
                 f"recorded over {a.profiled} profiled decode steps / (steps x layers), bytes from their input shapes; "
                 "outside/step = gloo collectives executed per decode step outside the compiled graph (gloo:* events "
                 "minus graph-issued ones: the wrapper's input checksum); ms/token = median over timed steps of the "
                 "slowest rank's forward+argmax (ranks start each timed step together after a barrier, not timed); min ms = the fastest timed step (the noise floor); vs 1x1 = that / the 1x1 run's; tokens = every rank's greedy tokens "
                 "(prefill + all decode steps) vs the 1x1 run's. AR all_reduce, A2A all_to_all, AG all_gather, "
                 "RS reduce_scatter.")

    # goals
    s = []
    kv_rows = [m for m in rows if "kv_goal" in m and m["cp"] > 1]
    if kv_rows:
        bad = [m for m in kv_rows if not m["kv_goal"]]
        detail = "; ".join(f"{m['tp']}x{m['cp']}@{m['ctx']}: {m['kv_slots_measured']:.1f} slots vs "
                           f"{m['kv_slots_ideal']:.1f}" for m in kv_rows)
        s.append(f"goal: KV bytes per rank within one interleave block ({a.kv_interleave} slot(s)) of 1/cp of the single "
                 f"device's per TP shard: {'MET' if not bad else 'NOT MET'} ({detail}; slots per rank excluding the sink)")
    else:
        s.append("goal: KV bytes per rank within one interleave block of 1/cp: not measured (no cp > 1 mesh ran)")
    indep, detail = [], []
    for tp, cp in a.mesh_list:
        per_ctx = [m for m in rows if (m["tp"], m["cp"]) == (tp, cp)]
        if len(per_ctx) < 2 or tp * cp == 1:
            continue
        st = {m["static_bytes"] for m in per_ctx}
        rt = {m.get("rt_bytes") for m in per_ctx}
        ok = len(st) == 1 and len(rt) == 1
        indep.append(ok)
        g_txt = "/".join(f"{m['static_bytes']:.0f}" for m in per_ctx)
        r_txt = "/".join(f"{m.get('rt_bytes', float('nan')):.0f}" for m in per_ctx)
        detail.append(f"{tp}x{cp}: graph {g_txt} B, run-time {r_txt} B per layer per step")
    if indep:
        s.append(f"goal: bytes moved per decode step independent of context length ({'/'.join(map(str, a.context_list))}): "
                 f"{'MET' if all(indep) else 'NOT MET'} ({'; '.join(detail)})")
    else:
        s.append("goal: bytes moved per decode step independent of context length: not measured (needs a parallel mesh at 2+ contexts)")
    failed = [k for k, r in results.items() if not r["ok"]]
    if failed:
        s.append(f"FAILED meshes: {', '.join(f'{tp}x{cp}@{ctx}' for tp, cp, ctx in failed)} (error text above)")
    mism = [m for m in rows if m.get("mismatch_ranks")]
    if mism:
        s.append("MISMATCH: " + "; ".join(f"{m['tp']}x{m['cp']}@{m['ctx']} {m['first_mismatch']} (1x1 smallest "
                                          f"top-1/top-2 gap {m['ref_min_gap']:.2e})" for m in mism))
    if rows:
        names = {}
        for m in rows:
            for k, v in (m.get("profile_names") or {}).items():
                names[k] = names.get(k, 0) + v
        s.append("profiler event names seen (all meshes, profiled steps, rank 0): " + ", ".join(sorted(names)) if names
                 else "profiler: no collective events recorded")
    s.append(f"NOTE: {os.cpu_count()} cores, 1 thread per rank; 4-rank meshes share cores, so their ms/token shows "
             "overheads (collectives, oversubscription), not speed-up. 2-rank meshes have a core each but every "
             "parallel step also pays gloo round trips over loopback that the 1x1 run does not.")
    s.extend(notes)
    return "\n".join(lines), "\n".join(s)


def _json_rows(a, results) -> list:
    out = []
    for (tp, cp, ctx), r in results.items():
        if not r["ok"]:
            out.append(dict(tp=tp, cp=cp, ctx=ctx, ok=False, error=r["error"], detail=r["detail"][-4000:]))
            continue
        m = _row_metrics(a, results, tp, cp, ctx)
        m = {k: v for k, v in m.items() if k != "step_s"}
        m["step_ms"] = [1e3 * t for t in _row_metrics(a, results, tp, cp, ctx)["step_s"]]
        m["ok"] = True
        out.append(m)
    return out


if __name__ == "__main__":
    sys.exit(main())

"""Local layouts (cpcompile/passes/local_layouts.py): what a rank allocates and computes
outside the matmuls, before and after, and what a 4096-token prefill costs on a gloo world.

    python benchmarks/bench_local_layouts.py                       # both parts, defaults
    python benchmarks/bench_local_layouts.py --part graph --meshes 2x1,2x2,4x1 --json /tmp/ll.json
    python benchmarks/bench_local_layouts.py --part prefill --tokens 4096 --reps 3
    python benchmarks/bench_local_layouts.py --part graph --sweep   # pads / kept-full on every tiny arch x mesh

Part `graph` (static, from the graphs' shapes; no process group). A Llama-3-8B-proportioned model
(hidden 512, 8 heads of 64, 2 KV heads, intermediate 1792 = 3.5 x hidden, 2 layers) is captured as
parallelize captures it: the plan from the single-device graph, each rank's graph against its own
KV cache. For each mesh and each graph (prefill: 1 row of `--prefill-tokens` tokens; decode: 4 rows
of 1 token), per decoder layer (averaged over the layers; a node belongs to the layer of its nearest
ancestor that Dynamo traced inside `layers.<i>`):

  * activation bytes: the output size of every node that allocates (not a view, a slice, a getitem,
    a transpose / permute / expand / reshape), matmul and attention outputs included; the collectives'
    own buffers (the row-parallel all-reduce of [T, hidden], the combine's exchange) are not counted
    here: they are the sharding's price, not a layout's, and the pass reports count them (`collective_bytes`);
  * elementwise FLOPs: one per output element of every op that is not a view, a data movement
    (pad, cat, index_select, slicing copies), a matmul, the attention kernel or a collective, plus
    one per input element of a reduction (sum / mean / norms);

for the single device (tp = cp = 1: the attention kernel, no sharding), the rank *before* (local_layouts
off: the sharded values padded back to full width, as cpcompile did until issue 13) and *after*,
and the *ideal*: each single-device node divided by r, the number of ranks its values are split
over (q's heads: tp; K/V's heads: tp, which is more than the KV heads allow at tp > Hkv; the
attention output after the combine: tp * cp under all_to_all / ag_rs, tp under all_gather; the
FFN: its group, tp * cp under ffn='tp'; everything else, the residual stream and its norms: 1).
Goal printed: after within 5% of ideal, except where the combine adds work (the LSE rescale of the
partial outputs at cp > 1) or the duplicated KV heads of tp > Hkv.

`--sweep`: every architecture of cpcompile/tiny.py at every mesh shape the suite runs, at every
rank: pads and kept-full nodes left after local_layouts (goal: 0 and 0), statistics all-reduced.

Part `prefill` (timed, `--tokens` 4096 on CPU, tp = 2, gloo, Inductor). Each rank of a 2-rank
World parallelizes the same model twice, once with local_layouts off (before) and once on (after), with
`prefill_chunk = tokens`, so the prompt is one graph; after a compiling warm-up call each, `--reps`
rounds alternate the two (the order rotated per round); a round's time is the slower rank's, the
figure the median. Peak memory per rank: one more call of each, the peak resident memory during
the call above what was resident when it started (`/proc/self/clear_refs` resets the peak; glibc
is told to map every buffer of 64 KiB or more on its own, so a freed buffer leaves the RSS and a
new one enters it). (torch.profiler's memory events do not see Inductor's CPU buffers.)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

_c10d = torch.ops._c10d_functional
_COLLECTIVES = {_c10d.all_reduce.default, _c10d.all_to_all_single.default, _c10d.all_gather_into_tensor.default,
                _c10d.reduce_scatter_tensor.default}
_VIEWS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze", "flatten",
          "unflatten", "getitem", "split", "chunk", "contiguous", "detach", "alias", "narrow", "t", "swapaxes",
          "view_as", "expand_as", "size", "dim"}
_MOVES = {"pad", "cat", "stack", "index_select", "index_copy_", "index_copy", "clone", "to", "copy_", "new_empty",
          "zeros", "empty", "full", "ones", "arange", "zeros_like", "empty_like"}
_MATMULS = {"linear", "matmul", "bmm", "mm", "addmm", "attention_with_lse", "merge_states", "baddbmm", "einsum"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "std", "rms_norm", "layer_norm", "softmax", "logsumexp"}


def _op(n) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0] if isinstance(t, torch._ops.OpOverload) else name


def _layer(n, memo: dict) -> int | None:
    """Decoder layer of `n`: its own module stack, else its nearest traced ancestor's."""
    if n in memo:
        return memo[n]
    todo, seen, where = [n], {n}, None
    while todo and where is None:
        m = todo.pop(0)
        stack = m.meta.get("nn_module_stack")
        if stack:
            hit = re.search(r"layers[.\[](\d+)", list(stack.values())[-1][0])
            where = int(hit[1]) if hit else -1
        for x in m.all_input_nodes:
            if x not in seen:
                seen.add(x)
                todo.append(x)
    memo[n] = None if where in (None, -1) else where
    return memo[n]


def node_cost(n) -> tuple[int, int]:
    """(activation bytes, elementwise FLOPs) of one node, from its fake value (module docstring)."""
    if n.op not in ("call_function", "call_method"):
        return 0, 0
    v = n.meta.get("val", n.meta.get("example_value"))
    name = _op(n)
    if not isinstance(v, torch.Tensor) or name in _VIEWS:
        return 0, 0
    nbytes = v.numel() * v.element_size()
    if name.endswith("_"):
        return 0, 0  # in place (the cache write's index_copy_): no allocation
    if n.target is _c10d.wait_tensor.default or n.target in _COLLECTIVES:
        return 0, 0  # a collective's buffer: the price of the sharding itself, reported apart (collective_bytes)
    if name in _MOVES or name in _MATMULS:
        return nbytes, 0
    if name in _REDUCTIONS:
        x = n.args[0].meta.get("val") if n.args and hasattr(n.args[0], "meta") else None
        return nbytes, (x.numel() if isinstance(x, torch.Tensor) else v.numel())
    return nbytes, v.numel()


def per_layer(gm, weight=None, keep=lambda n: True) -> dict[str, float]:
    """Bytes and FLOPs per decoder layer (mean over layers) of the nodes `keep` selects; `weight(n)`:
    a factor per node (the ideal's 1/r)."""
    memo, tot = {}, {}
    for n in gm.graph.nodes:
        layer = _layer(n, memo)
        if layer is None or not keep(n):
            continue
        b, f = node_cost(n)
        w = weight(n) if weight else 1.0
        t = tot.setdefault(layer, [0.0, 0.0])
        t[0] += b * w
        t[1] += f * w
    layers = max(len(tot), 1)
    return {"bytes": sum(t[0] for t in tot.values()) / layers, "flops": sum(t[1] for t in tot.values()) / layers}


def combine_nodes(gm) -> set:
    """The CP combine in a rank graph: the nodes from the attention kernel's outputs to the local
    attention output that rewrite_attention marks (the exchange, the LSE rescale, the merge)."""
    from cpcompile.passes._fx import ancestors, descendants, is_op

    lse = torch.ops.cpcompile.attention_with_lse.default
    attn = [n for n in gm.graph.nodes if n.target is lse]
    after = descendants(attn, lambda m: is_op(m, "linear"))  # up to the next projection (o_proj)
    ends = [n.meta["cpcompile_local"].node for n in gm.graph.nodes
            if "cpcompile_local" in n.meta and n.meta["cpcompile_local"].node in after
            and not is_op(n.meta["cpcompile_local"].node, "linear")]
    between = set()
    for e in ends:
        between |= ancestors(e, lambda m: m.target is lse) | {e}
    return (between & descendants(attn, lambda m: False)) - set(ends)


def ideal_factor(gm, analysis, shards: dict, sizes: dict, out_r: int):
    """node -> 1/r for the single-device graph (module docstring): regions from each sharded column
    projection (and from the attention output) down to the next linear / attention."""
    from cpcompile.passes._fx import descendants, is_op

    lse = torch.ops.cpcompile.attention_with_lse.default
    stop = lambda m: is_op(m, "linear") or m.target is lse
    factor = {}
    for p in analysis.roles.projections:
        s = shards.get(p.weight)
        if s is not None and s.kind == "column":
            r = sizes[s.group]
            for m in {m for m in descendants([p.node], stop) if not is_op(m, "linear")} | {p.node}:
                factor[m] = min(factor.get(m, 1.0), 1.0 / r)  # (the row consumer's output is whole)
    attn = [n for n in gm.graph.nodes if n.target is lse]
    q_r = sizes["tp"]  # the kernel attends this rank's tp share of the heads (over its slots at cp > 1)
    for m in set(attn) | {u for a in attn for u in a.users}:
        factor[m] = 1.0 / q_r
    for m in {m for m in descendants(attn, lambda m: is_op(m, "linear")) if not is_op(m, "linear")} - set(factor):
        factor[m] = min(factor.get(m, 1.0), 1.0 / out_r)
    return lambda n: factor.get(n, 1.0)


# ---- building the graphs ----------------------------------------------------------------------
def build_model(a: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                      num_hidden_layers=a["layers"], num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"],
                      head_dim=a["hidden"] // a["heads"], max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def rank_graphs(model, tp: int, cp: int, combine: str, rank: int, rows: int, tokens: int, max_length: int) -> dict:
    """The single device's graph and rank `rank`'s with local_layouts off ('before') and on ('after'),
    every pass run as explain runs them (`cpcompile.explain.rank_graph`); the combine's nodes of each
    rank graph; local_layouts' counts; the single device's ideal factors."""
    import cpcompile.passes as passes
    from cpcompile.distributed import RankContext
    from cpcompile.explain import rank_graph
    from cpcompile.options import Options
    from cpcompile.capture import capture
    from cpcompile.passes.shard_weights import shard_weights

    options = Options(tp=tp, cp=cp, combine=combine)
    analysis = capture(model, options)
    real, out = passes.keep_local, {}

    def run(variant):
        def keep_local(gm):  # the combine's nodes, read while rewrite_attention's mark is still there
            out["combine_" + variant] = combine_nodes(gm)
            if variant == "after":
                return real(gm)
            for n in gm.graph.nodes:
                n.meta.pop("cpcompile_local", None)
            return {"seeds": 0, "local": 0, "ends": 0, "statistics": 0, "kept_full": 0}

        passes.keep_local = keep_local
        try:
            report, gm = rank_graph(model, options, analysis, rank, rows, tokens, max_length)
        finally:
            passes.keep_local = real
        out[variant] = gm
        if variant == "after":
            out["counts"] = {k[len("local_"):]: v for k, v in report.counts.items() if k.startswith("local_")}

    run("before")
    run("after")
    report, single = rank_graph(model, Options(), None, 0, rows, tokens, max_length)
    ctx = RankContext.of(options, rank, {g: f"bench_{g}" for g in ("tp", "cp", "dp", "replica", "world")})
    shards = shard_weights(analysis, ctx)
    out_r = tp * cp if combine != "all_gather" and cp > 1 else tp
    out["single"] = single
    out["ideal"] = ideal_factor(single, report.analysis, shards, {g: ctx.size(g) for g in ("tp", "cp", "replica")}, out_r)
    return out


def graph_part(a: dict) -> list[dict]:
    model = build_model(a)
    rows = []
    for mesh in a["meshes"]:
        tp, cp, combine = mesh
        for graph, (batch, tokens) in (("prefill", (1, a["prefill_tokens"])), ("decode", (4, 1))):
            g = rank_graphs(model, tp, cp, combine, 0, batch, tokens, a["prefill_tokens"] + 16)
            cb, ca = g["combine_before"], g["combine_after"]
            rows.append({"mesh": f"{tp}x{cp}" + (f" {combine}" if cp > 1 else ""), "graph": graph, "counts": g["counts"],
                         "single": per_layer(g["single"]), "ideal": per_layer(g["single"], g["ideal"]),
                         "before": per_layer(g["before"], keep=lambda n: n not in cb),
                         "after": per_layer(g["after"], keep=lambda n: n not in ca),
                         "combine": per_layer(g["after"], keep=lambda n: n in ca)})
    return rows


def print_graph(rows: list[dict]) -> None:
    print("\nPer rank (rank 0), per decoder layer; ratios to the single device. Ideal: each value split over its ranks.")
    print(f"{'mesh':<18}{'graph':<9}{'':>5}{'single':>11}{'before':>11}{'after':>11}{'ideal':>11}"
          f"{'before/1':>10}{'after/1':>9}{'ideal/1':>9}{'after/ideal':>13}")
    for r in rows:
        for k, unit in (("bytes", "KiB"), ("flops", "kFLOP")):
            s, b, af, i = (r[x][k] / 1024 if k == "bytes" else r[x][k] / 1000 for x in ("single", "before", "after", "ideal"))
            gap = af / i - 1
            print(f"{r['mesh']:<18}{r['graph']:<9}{k:>5}{s:>11.1f}{b:>11.1f}{af:>11.1f}{i:>11.1f}"
                  f"{b / s:>10.3f}{af / s:>9.3f}{i / s:>9.3f}{af / i:>13.3f}  ({unit}){'' if gap <= 0.05 else '  > 5%'}")
        c, cmb = r["counts"], r["combine"]
        if cmb["bytes"] or cmb["flops"]:
            print(f"{'':<27}the combine, apart (not in the columns above): {cmb['bytes'] / 1024:.1f} KiB, "
                  f"{cmb['flops'] / 1000:.1f} kFLOP per layer")
        print(f"{'':<27}local_layouts: {c['seeds']} seeds, {c['local']} nodes local, {c['ends']} ends, "
              f"{c['statistics']} statistics, {c['kept_full']} kept full")


# ---- sweep ------------------------------------------------------------------------------------
def sweep() -> list[dict]:
    """Every tiny architecture x mesh x rank: pads and kept-full nodes left."""
    from cpcompile.tiny import ARCHITECTURES, MLA_ARCHITECTURES, MOE_ARCHITECTURES, tiny_model

    out = []
    for arch in ARCHITECTURES + MOE_ARCHITECTURES + MLA_ARCHITECTURES[1:]:
        model = tiny_model(arch)
        for tp, cp, combine in ((2, 1, "all_to_all"), (1, 2, "all_to_all"), (2, 2, "all_to_all"), (2, 2, "all_gather"),
                                (2, 2, "ag_rs"), (4, 1, "all_to_all")):
            for rank in range(tp * cp):
                g = rank_graphs(model, tp, cp, combine, rank, 2, 3, 16)
                pads = sum(n.op == "call_function" and n.target is F.pad for n in g["after"].graph.nodes)
                out.append({"arch": arch, "mesh": f"{tp}x{cp} {combine}", "rank": rank, "pads": pads, **g["counts"]})
                print(f"{arch:<12}{tp}x{cp} {combine:<11} rank {rank}: pads {pads}, kept full {g['counts']['kept_full']}, "
                      f"statistics {g['counts']['statistics']}", flush=True)
    bad = [r for r in out if r["pads"] or r["kept_full"]]
    print(f"\nsweep: {len(out)} rank graphs, {len(bad)} with a pad or a node kept full: {'MET' if not bad else 'NOT MET'}")
    return out


# ---- prefill on a gloo world ------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _peak_bytes(fn) -> int:
    """Peak resident memory during fn() above what was resident when it started (Linux: the peak RSS
    is reset through /proc/self/clear_refs; every buffer of 64 KiB or more is its own mapping, given
    back when freed, since main() fixes glibc's MALLOC_MMAP_THRESHOLD_ before the ranks start)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS:")
    fn()
    return _status("VmHWM:") - base


def prefill_rank(a: dict) -> dict:
    import copy

    import torch.distributed as dist

    import cpcompile
    import cpcompile.passes as passes

    model = build_model(a)
    tokens = a["tokens"]
    real = passes.keep_local

    def off(gm):
        for n in gm.graph.nodes:
            n.meta.pop("cpcompile_local", None)
        return {"seeds": 0, "local": 0, "ends": 0, "statistics": 0, "kept_full": 0}

    models = {}
    for variant in ("before", "after"):
        passes.keep_local = off if variant == "before" else real
        m = cpcompile.parallelize(copy.deepcopy(model), tp=2, cp=1, max_length=tokens + 8, prefill_chunk=tokens,
                                  lowering="inductor")
        models[variant] = m
    ids = torch.randint(3, a["vocab"], (1, tokens), generator=torch.Generator().manual_seed(1))

    def call(variant):
        passes.keep_local = off if variant == "before" else real  # (a recompile would take the same path)
        with torch.no_grad():
            return models[variant](input_ids=ids, use_cache=True, logits_to_keep=1).logits

    compile_s, logits = {}, {}
    for v in models:
        t0 = time.perf_counter()
        logits[v] = call(v)
        compile_s[v] = time.perf_counter() - t0
    times = {v: [] for v in models}
    order = list(models)
    for i in range(a["reps"]):
        for v in order[i % 2:] + order[: i % 2]:
            dist.barrier()
            t0 = time.perf_counter()
            call(v)
            times[v].append(time.perf_counter() - t0)
    peak = {v: _peak_bytes(lambda: call(v)) for v in models}
    passes.keep_local = real
    return {"times": times, "peak": peak, "compile_s": compile_s,
            "same_logits": bool(torch.equal(logits["before"].argmax(-1), logits["after"].argmax(-1))),
            "max_diff": float((logits["before"] - logits["after"]).abs().max())}


def prefill_part(a: dict) -> dict:
    import os

    from cpcompile.testing import World

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the ranks' glibc at start (see _peak_bytes)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_local_layouts  # the workers unpickle prefill_rank by reference to this module

    with World(2) as world:
        res = world.run(bench_local_layouts.prefill_rank, a, timeout_s=a["timeout_s"])
    out = {}
    for v in ("before", "after"):
        per_round = [max(r["times"][v][i] for r in res) for i in range(a["reps"])]
        out[v] = {"median_s": statistics.median(per_round), "rounds_s": per_round,
                  "peak_bytes": [r["peak"][v] for r in res], "compile_s": [r["compile_s"][v] for r in res]}
    out["same_tokens"] = all(r["same_logits"] for r in res)
    out["max_logit_diff"] = max(r["max_diff"] for r in res)
    return out


def print_prefill(a: dict, p: dict) -> None:
    b, af = p["before"], p["after"]
    print(f"\nPrefill {a['tokens']} tokens, tp=2 gloo, Inductor, 1 thread per rank ({a['reps']} rounds, median of the slower rank):")
    print(f"  time        before {b['median_s']:.3f} s   after {af['median_s']:.3f} s   after/before {af['median_s'] / b['median_s']:.3f}")
    for r in range(2):
        pb, pa = b["peak_bytes"][r], af["peak_bytes"][r]
        print(f"  peak rank {r} before {pb / 2**20:.1f} MiB   after {pa / 2**20:.1f} MiB   after/before {pa / pb:.3f}")
    print(f"  logits: same greedy token {p['same_tokens']}, max |before - after| {p['max_logit_diff']:.2e}")


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="both", choices=("graph", "prefill", "both"))
    p.add_argument("--meshes", default="2x1,2x2,2x2:all_gather,4x1", help="TPxCP[:combine], comma-separated")
    p.add_argument("--prefill-tokens", type=int, default=256, help="the graph part's prefill graph (1 row)")
    p.add_argument("--tokens", type=int, default=4096, help="the prefill part's prompt (1 row, one chunk)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1792)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--timeout-s", type=int, default=1800)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--json")
    args = vars(p.parse_args(argv))
    meshes = []
    for m in args["meshes"].split(","):
        shape, _, combine = m.partition(":")
        tp, cp = (int(x) for x in shape.split("x"))
        meshes.append((tp, cp, combine or "all_to_all"))
    args["meshes"] = meshes
    return args


def main(argv=None) -> int:
    a = parse_args(argv)
    result = {"args": {k: v for k, v in a.items()}}
    if a["sweep"]:
        result["sweep"] = sweep()
    elif a["part"] in ("graph", "both"):
        result["graph"] = graph_part(a)
        print_graph(result["graph"])
    if a["part"] in ("prefill", "both") and not a["sweep"]:
        result["prefill"] = prefill_part(a)
        print_prefill(a, result["prefill"])
    if a["json"]:
        with open(a["json"], "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

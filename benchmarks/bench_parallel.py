"""Parallel decode benchmark on CPU: per-rank memory, collectives and step time, per mesh and per scheme.

    python benchmarks/bench_parallel.py                               # both parts, defaults (see below)
    python benchmarks/bench_parallel.py --part schemes --lowering aot_eager --json /tmp/par.json
    python benchmarks/bench_parallel.py --part meshes --meshes 1x2,2x2 --contexts 256
    python benchmarks/bench_parallel.py --quick                      # fewer steps, one context

Two parts. `meshes` (below) sweeps tp x cp meshes over context lengths; `schemes` (after it)
compares the data-parallel and token-split schemes with tp-only at the same rank count.

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
    (`cpcompile.sharding.weight_bytes`), as fractions of the 1x1 run's;
  * collectives and bytes per layer per decode step, statically from the decode graph's pass
    report (`collectives` / `collective_bytes` divided by the number of layers), and at run time
    from the profiler: `_c10d_functional::*` events (the collectives the compiled graph issued),
    and `gloo:*` events (what the gloo backend executed, graph or not). Collectives executed
    outside the graph (the wrapper's per-call input checksum) are reported separately, per step;
  * decode time per token against the single-device (1x1) cpcompile run, as a ratio;
  * the greedy tokens of every rank against the 1x1 run's.

Goals printed with MET / NOT MET: per-rank KV within one interleave block of 1/cp of the single
device's per TP shard; decode bytes moved per step independent of context length.

Part `schemes` (`--schemes`, default tp2 dp2 dp2-world_tp cp2-sp | tp4 dp2xcp2 dp2xtp2 tp2xcp2-sp;
a scheme is `dp<D>x tp<T>x cp<C>` with an optional `-<ffn>`, ffn 'tp' when omitted). Schemes of
the same rank count run in one World call, each rank holding one parallelized model per scheme
plus, on rank 0 only, the single-device model (tp = cp = dp = 1). For each global batch of
`--batches` (default 8, divisible by dp=2, and 5, ragged: rows 3 + 2) and prompt length
`--scheme-context`: a prefill and `--warmup` untimed decode steps per model (compiles), then
`--rounds` rounds; in each round every model (the single-device one included) runs
`--scheme-steps / --rounds` decode steps in turn, the order rotated each round, so the schemes
and their references share the machine's load (as in bench_decode.py). Each timed step: a
barrier of all ranks (not timed), `perf_counter` around forward + argmax, the slowest rank's
time; the figure is the median over the scheme's timed steps. Then `--profiled` steps per model
under the profiler. dp uses `dp_inputs='global'` (every rank passes the whole batch and gets
every row's logits back).

Measured per scheme and batch: per-rank KV bytes (the KVCache the forward returned; under dp it
holds only that replica's rows) and weight bytes, over the single device's; FFN tokens per rank
per decode step (`counts["ffn_tokens"]` of the decode graph, padding included) beside T, the
batch's tokens per step; collectives and bytes per layer per decode step, and those issued once
per step outside the layers (the logits all-gather of dp, the all-gather before the LM head of
sp), from the decode graph as the passes left it (observed by wrapping `cpcompile.backend.lower`,
read only; each collective is attributed to the decoder layer of its nearest traced ancestor; the
totals are checked against the pass report's `collectives` / `collective_bytes`); ms/token vs
the single-device model and vs tp<n> (tp only at the same rank count), both timed interleaved
in the same world; the greedy tokens of every rank against the single device's.

Goals printed with MET / NOT MET: every scheme's tokens equal the single device's (the script
exits 1 if not); FFN tokens per rank under ffn='sp' == ceil(T/cp) (not T), in decode and
prefill; FFN tokens per rank of every scheme as its layout says (tp: the replica's tokens,
world_tp: dp x the largest replica's, padded); KV bytes per rank under dp == rows_d / B of the
dp = 1 run with the same tp x cp (the same tp_rank, cp_rank), exactly; the profiler's
collectives per step == the graph's; no graph compiled during timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from cpcompile._hf import output_cache, cache_arg

from _machine import cpu_model

KINDS = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter")
SHORT = {"all_reduce": "AR", "all_to_all": "A2A", "all_gather": "AG", "reduce_scatter": "RS"}
DEFAULT_SCHEMES = "tp2,dp2,dp2-world_tp,cp2-sp,tp4,dp2xcp2,dp2xtp2,tp2xcp2-sp"
QUICK = dict(contexts="256", steps=8, profiled=2, scheme_steps=16, rounds=4)


@dataclass(frozen=True)
class Scheme:
    """One parallel layout of the schemes part: `dp x tp x cp` ranks, the FFN placement."""

    name: str
    dp: int = 1
    tp: int = 1
    cp: int = 1
    ffn: str = "tp"

    @property
    def ranks(self) -> int:
        return self.dp * self.tp * self.cp

    def kwargs(self) -> dict:
        return dict(dp=self.dp, tp=self.tp, cp=self.cp, ffn=self.ffn)


SINGLE = Scheme("1 device")


def parse_scheme(text: str) -> Scheme:
    """'dp2xcp2-world_tp' -> Scheme(dp=2, cp=2, ffn='world_tp'); the ffn defaults to 'tp'."""
    mesh, _, ffn = text.strip().partition("-")
    sizes: dict[str, int] = {}
    for part in mesh.split("x"):
        m = re.fullmatch(r"(dp|tp|cp)(\d+)", part)
        if m is None or m[1] in sizes:
            raise SystemExit(f"--schemes: {text!r}: expected parts dp<D>, tp<T>, cp<C> joined by 'x' (each once), "
                             "then optionally -tp / -sp / -world_tp, e.g. dp2xcp2-world_tp")
        sizes[m[1]] = int(m[2])
    return Scheme(text.strip(), ffn=ffn or "tp", **sizes)


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
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one mesh x context (schemes part: one scheme) may take before its world is torn down")
    p.add_argument("--json", metavar="PATH", default="")
    p.add_argument("--part", default="all", choices=["all", "meshes", "schemes"], help="which part to run")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES, help="comma list of dp<D>xtp<T>xcp<C>[-ffn] (the single device and "
                   "tp<n> at each rank count n are always run: they are the references)")
    p.add_argument("--batches", default="8,5", help="comma list of global batch sizes for the schemes part")
    p.add_argument("--scheme-context", type=int, default=256, help="prompt length for the schemes part")
    p.add_argument("--scheme-steps", type=int, default=64, help="timed decode steps per scheme and batch (schemes part)")
    p.add_argument("--rounds", type=int, default=16, help="the timed steps are run in this many interleaved rounds")
    p.add_argument("--quick", action="store_true", help=f"shorter run: {QUICK}, unless given explicitly")
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    a.scheme_list = [parse_scheme(x) for x in a.schemes.split(",") if x]
    a.batch_list = [int(b) for b in a.batches.split(",")]
    if a.rounds < 1 or a.scheme_steps < a.rounds:
        p.error(f"--scheme-steps {a.scheme_steps} must be at least --rounds {a.rounds} (>= 1)")
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


def outside_graph(p: dict, steps: int) -> dict:
    """gloo collectives per step that the compiled graph did not issue. gloo has no reduce-scatter:
    c10d runs each graph reduce_scatter as one gloo all_reduce, so those count as issued all_reduces."""
    issued = dict(p["graph"])
    if p["gloo"]["reduce_scatter"] == 0:
        issued["all_reduce"] += issued["reduce_scatter"]
        issued["reduce_scatter"] = 0
    return {k: (p["gloo"][k] - issued[k]) / steps for k in KINDS}


def bench_rank(a: dict, tp: int, cp: int, ctx: int) -> dict:
    """One mesh x context on this rank: prefill, decode steps (timed, then profiled)."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from cpcompile import parallelize
    from cpcompile.sharding import weight_bytes

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
        out = model(input_ids=ids, attention_mask=mask, **{cache_arg(model): cache}, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        top2 = logits.topk(2, dim=-1).values
        gaps.append((top2[:, 0] - top2[:, 1]).min().item())
        tokens.append(nxt)
        return nxt, output_cache(out)

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
            out = model(input_ids=nxt, attention_mask=mask, **{cache_arg(model): cache}, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t1)
            cache = output_cache(out)
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


# ----------------------------------------------------------------------------- schemes part, on every rank

_LOWERED: list = []  # collectives by layer of every graph this rank lowered, in order (see _observe_lowering)


def _observe_lowering() -> None:
    """Wrap `cpcompile.backend.lower` so the benchmark sees each graph as the passes left it.
    Read only: the wrapper records the graph's collectives by layer and calls the real lowering."""
    import cpcompile.backend as backend

    if getattr(backend.lower, "bench_observer", False):
        return  # the World's ranks persist across runs: wrap once
    real = backend.lower

    def lower(gm, example_inputs, lowering):
        _LOWERED.append(collectives_by_layer(gm))
        return real(gm, example_inputs, lowering)

    lower.bench_observer = True
    backend.lower = lower


def collectives_by_layer(gm) -> dict:
    """{'layers': {i: {kind: [count, bytes]}}, 'step': {kind: [count, bytes]}} for one graph.

    A collective belongs to decoder layer i when its input's nearest ancestor that Dynamo traced
    in a module (`nn_module_stack`) is in `...layers.<i>`; otherwise it runs once per step
    (embedding, final norm, LM head). Nodes the passes inserted carry no module stack, so the
    walk goes up through them. Bytes: the input tensor's size, as the pass report counts them."""
    ops = torch.ops._c10d_functional
    kind_of = {ops.all_reduce.default: "all_reduce", ops.all_to_all_single.default: "all_to_all",
               ops.all_gather_into_tensor.default: "all_gather", ops.reduce_scatter_tensor.default: "reduce_scatter"}
    out = {"layers": {}, "step": {}}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in kind_of:
            continue
        where, todo, seen = None, [n.args[0]], set()
        while todo and where is None:
            m = todo.pop(0)
            stack = m.meta.get("nn_module_stack")
            if stack:
                path = list(stack.values())[-1][0]
                hit = re.search(r"layers[.\[](\d+)", path)
                where = int(hit[1]) if hit else "step"
            for x in m.all_input_nodes:
                if x not in seen:
                    seen.add(x)
                    todo.append(x)
        v = n.args[0].meta.get("val", n.args[0].meta.get("example_value"))
        nbytes = v.numel() * v.element_size()
        slot = out["step"] if where in (None, "step") else out["layers"].setdefault(where, {})
        c = slot.setdefault(kind_of[n.target], [0, 0])
        c[0] += 1
        c[1] += nbytes
    return out


class _Run:
    """One model's decode state for one batch on this rank."""

    def __init__(self, scheme: Scheme, model, ctx: int, mask: torch.Tensor):
        self.scheme, self.model, self.ctx, self.mask = scheme, model, ctx, mask
        self.i, self.cache, self.nxt = 0, None, None
        self.tokens, self.gaps, self.times = [], [], []
        self.prefill = self.decode = None  # (pass reports, collectives by layer) of the graphs each compiled
        self.setup_s = self.compile_s = 0.0
        self.graphs_before_timed = 0
        self.profile = None

    @torch.no_grad()
    def forward(self, ids, timed: bool = False):
        if self.cache is not None:
            self.mask[:, self.ctx + self.i] = 1
            self.i += 1
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, attention_mask=self.mask if self.cache is not None else self.mask[:, : self.ctx],
                         **{cache_arg(self.model): self.cache}, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        if timed:
            self.times.append(time.perf_counter() - t0)
        self.cache, self.nxt = output_cache(out), nxt
        top2 = logits.topk(2, dim=-1).values
        self.gaps.append((top2[:, 0] - top2[:, 1]).min().item())
        self.tokens.append(nxt)


def _compiled_during(model, fn) -> tuple[list, list]:
    """Run fn(); return the pass reports and by-layer collectives of the graphs it compiled."""
    reports = model._cpcompile.backend.reports
    r0, l0 = len(reports), len(_LOWERED)
    fn()
    return [r.counts for r in reports[r0:]], _LOWERED[l0:]


def scheme_rank(a: dict, schemes: list, batches: list) -> dict:
    """Every scheme of this world size (plus the single device on rank 0), interleaved, per batch."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from cpcompile import parallelize
    from cpcompile.sharding import weight_bytes

    schemes = [Scheme(**d) for d in schemes]  # plain dicts across the pipe
    rank = dist.get_rank()
    _observe_lowering()
    # The models share the wrapper's code object; each model x batch x (prefill, decode) is one entry.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * (len(schemes) + 1) * len(batches) + 8)
    ctx = a["scheme_context"]
    L = ctx + a["warmup"] + a["scheme_steps"] + a["profiled"] + 8
    models = []
    for s in [SINGLE] + schemes:
        if s is SINGLE and rank != 0:
            continue  # the single-device reference runs on rank 0; the others wait in the step barriers
        model = build_model(a)
        t0 = time.perf_counter()
        parallelize(model, **s.kwargs(), combine=a["combine"], kv_interleave=a["kv_interleave"], max_length=L,
                    lowering=a["lowering"])
        models.append((s, model, time.perf_counter() - t0))  # every parallelize before any forward: capture resets Dynamo
    per_round = a["scheme_steps"] // a["rounds"]
    out = {}
    for B in batches:
        g = torch.Generator().manual_seed(a["seed"] + 1)
        prompt = torch.randint(0, a["vocab"], (B, ctx), generator=g)
        runs = {}
        for s, model, setup_s in models:
            mask = torch.zeros(B, L, dtype=torch.long)
            mask[:, :ctx] = 1
            run = runs[s.name] = _Run(s, model, ctx, mask)
            t0 = time.perf_counter()
            run.prefill = _compiled_during(model, lambda: run.forward(prompt))
            run.decode = _compiled_during(model, lambda: run.forward(run.nxt))
            for _ in range(a["warmup"] - 1):
                run.forward(run.nxt)
            run.compile_s, run.setup_s = time.perf_counter() - t0, setup_s
            run.graphs_before_timed = len(model._cpcompile.backend.reports)
        order = [SINGLE] + schemes
        for r in range(a["rounds"]):
            for s in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
                for _ in range(per_round):
                    dist.barrier()  # every rank starts the step together (not timed)
                    if s.name in runs:
                        runs[s.name].forward(runs[s.name].nxt, timed=True)
        for s in order:
            if s.name not in runs or not a["profiled"]:
                continue
            run = runs[s.name]
            if s is SINGLE:  # the same steps, unprofiled: its tokens are the reference for all of them
                for _ in range(a["profiled"]):
                    run.forward(run.nxt)
                continue
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(a["profiled"]):
                    run.forward(run.nxt)
            run.profile = profile_counts(prof, torch.finfo(torch.float32).bits // 8)
        for name, run in runs.items():
            layer0 = run.cache.layers[0]
            info = run.model._cpcompile.ctx
            out[(name, B)] = dict(
                rank=rank,
                dp_rank=info.dp_rank if info else 0,
                tp_rank=info.tp_rank if info else 0,
                cp_rank=info.cp_rank if info else 0,
                rows=layer0.batch_size,
                max_length=L,
                setup_s=run.setup_s,
                compile_s=run.compile_s,
                recompiles=len(run.model._cpcompile.backend.reports) - run.graphs_before_timed,
                prefill=run.prefill,
                decode=run.decode,
                kv_bytes=run.cache.kv_bytes(),
                kv_heads=(layer0.num_heads, layer0.global_heads),
                local_slots=run.cache.layout.local_slots,
                weight_bytes=weight_bytes(run.model),
                profile=run.profile,
                times=run.times,
                tokens=torch.cat(run.tokens, dim=1),
                gaps=run.gaps,
            )
    return out


# ----------------------------------------------------------------------------- parent


def _fmt_counts(c: dict, div: float) -> str:
    parts = [f"{SHORT[k]}{c.get(k, 0) / div:g}" for k in KINDS if c.get(k, 0)]
    return " ".join(parts) if parts else "-"


def _fmt_bytes(b: float) -> str:
    return f"{b / 1024:.2f}K" if b else "0"


def main(argv=None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_parallel  # the workers unpickle bench_rank / scheme_rank by reference to this module
    import transformers

    from cpcompile.testing import World, WorldError

    ad = {k: v for k, v in vars(a).items() if k not in ("mesh_list", "context_list", "scheme_list", "batch_list")}
    print(f"CPU parallel decode benchmark -- device: CPU ({cpu_model()}, {os.cpu_count()} logical cores), "
          f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, gloo")
    print(f"model: Llama layers={a.layers} hidden={a.hidden} intermediate={a.intermediate} heads={a.heads} "
          f"kv_heads={a.kv_heads} vocab={a.vocab} fp32 | lowering={a.lowering} combine={a.combine} "
          f"kv_interleave={a.kv_interleave}")
    if a.part in ("all", "meshes"):
        print(f"meshes: batch={a.batch} contexts={a.context_list} | {a.warmup} warmup + {a.steps} timed + "
              f"{a.profiled} profiled decode steps")
    if a.part in ("all", "schemes"):
        print(f"schemes: {', '.join(s.name for s in a.scheme_list)} | batches={a.batch_list} prompt={a.scheme_context} | "
              f"{a.warmup} warmup + {a.scheme_steps} timed (in {a.rounds} interleaved rounds) + {a.profiled} profiled "
              "decode steps per scheme")
    ncores = os.cpu_count() or 1
    print(f"NOTE: {ncores} cores, 1 thread per rank: meshes with more than {ncores} ranks share cores, so their "
          "time per token measures overheads (collectives, scheduling), not speed-up.")
    try:
        print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes on this machine also compete for the cores)")
    except OSError:
        pass

    worlds: dict[int, World] = {}

    def run_on(n: int, fn, *args, timeout_mult: int = 1) -> dict:
        """fn on a world of n ranks -> {ok, ranks} or {ok: False, error, detail}."""
        try:
            if n not in worlds:
                worlds[n] = World(n)
            return dict(ok=True, ranks=worlds[n].run(fn, *args, timeout_s=a.timeout * timeout_mult), size=n)
        except WorldError as e:
            tbs = getattr(e, "tracebacks", {}) or {}
            err = _last_error_line(next(iter(tbs.values()))) if tbs else str(e).splitlines()[0]
            return dict(ok=False, error=err, detail=str(e), size=n)

    results: dict[tuple, dict] = {}
    sres: dict[int, dict] = {}
    t_start = time.perf_counter()
    try:
        if a.part in ("all", "meshes"):
            for ctx in a.context_list:
                for tp, cp in a.mesh_list:
                    t0 = time.perf_counter()
                    r = results[(tp, cp, ctx)] = run_on(tp * cp, bench_parallel.bench_rank, ad, tp, cp, ctx)
                    status = "ok" if r["ok"] else f"FAILED: {r['error']}"
                    print(f"  {tp}x{cp} ctx {ctx}: {time.perf_counter() - t0:6.1f} s  {status}", flush=True)
        if a.part in ("all", "schemes"):
            for n in sorted({s.ranks for s in a.scheme_list}):
                group = [dataclasses.asdict(s) for s in _schemes_in_order(a) if s.ranks == n]
                t0 = time.perf_counter()
                r = sres[n] = run_on(n, bench_parallel.scheme_rank, ad, group, a.batch_list, timeout_mult=len(group))
                status = "ok" if r["ok"] else f"FAILED: {r['error']}"
                print(f"  schemes on {n} ranks ({', '.join(g['name'] for g in group)}; batches {a.batch_list}): "
                      f"{time.perf_counter() - t0:6.1f} s  {status}", flush=True)
    finally:
        for w in worlds.values():
            w.close()
    total_s = time.perf_counter() - t_start
    ok = True
    out = {}
    if results:
        table, summary = report(a, results)
        print()
        print(table)
        print(summary)
        ok &= not any(x in summary for x in ("NOT MET", "MISMATCH", "FAILED"))
        out["rows"] = _json_rows(a, results)
    if sres:
        table, rows, table_ok = report_schemes(a, sres)
        goals, goals_ok = scheme_goals(a, rows, sres)
        print()
        print(table)
        print(goals)
        ok &= table_ok and goals_ok
        out["scheme_rows"] = rows
        out["scheme_failures"] = {n: r["detail"][-4000:] for n, r in sres.items() if not r["ok"]}
    print(f"(total wall time {total_s:.0f} s)")
    if not ok:
        print("FAILED: a check above did not pass (MISMATCH / NOT MET / FAILED / NOTE lines)")
    if a.json:
        out.update({
            "device": "CPU",
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "args": ad,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "total_s": total_s,
        })
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"wrote {a.json}")
    return 0 if ok else 1


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
        m["outside_per_step"] = outside_graph(p, ns)
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


# ----------------------------------------------------------------------------- schemes part, parent


def _split_rows(batch: int, dp: int) -> list[int]:
    """The rows of each replica in dp_inputs='global' mode, as cpcompile.data_parallel.split_rows."""
    return [batch // dp + (1 if d < batch % dp else 0) for d in range(dp)]


def _expected_ffn_tokens(s: Scheme, batch: int, dp_rank: int, new_tokens: int) -> int:
    """FFN tokens per rank per graph run that scheme `s`'s layout implies (padding included)."""
    rows = _split_rows(batch, s.dp)
    mine = rows[dp_rank] * new_tokens  # this replica's tokens
    if s.ffn == "sp" and s.cp > 1:
        return math.ceil(mine / s.cp)
    if s.ffn == "world_tp" and s.dp > 1:
        return s.dp * max(rows) * new_tokens
    return mine


def _per_layer(lowered: dict, layers: int) -> tuple[dict, dict, bool]:
    """(per-layer {kind: [count, bytes]}, per-step {kind: [count, bytes]}, every layer the same)."""
    per = [lowered["layers"].get(i, {}) for i in range(layers)]
    same = all(p == per[0] for p in per)
    avg = {k: [sum(p.get(k, [0, 0])[j] for p in per) / layers for j in (0, 1)] for k in KINDS}
    return avg, {k: lowered["step"].get(k, [0, 0]) for k in KINDS}, same


def _scheme_metrics(a, world: dict, s: Scheme, B: int) -> dict:
    """Everything the table and the goals need for scheme `s` at global batch `B` (`world`: its World's results)."""
    ranks = [r[(s.name, B)] for r in world["ranks"] if (s.name, B) in r]
    ref = world["ranks"][0][(SINGLE.name, B)]
    base = world["ranks"][0].get((f"tp{world['size']}", B))
    m = dict(scheme=s.name, ranks=s.ranks, world=world["size"], batch=B, dp=s.dp, tp=s.tp, cp=s.cp, ffn=s.ffn)
    m["rows"] = _split_rows(B, s.dp)
    m["kv_bytes"] = [x["kv_bytes"] for x in ranks]
    m["weight_bytes"] = [x["weight_bytes"] for x in ranks]
    m["kv_frac"] = [x / ref["kv_bytes"] for x in m["kv_bytes"]]
    m["w_frac"] = [x / ref["weight_bytes"] for x in m["weight_bytes"]]
    steps = list(zip(*[x["times"] for x in ranks]))
    m["step_ms"] = [1e3 * max(t) for t in steps]
    m["ms"] = statistics.median(m["step_ms"])
    m["ms_min"] = min(m["step_ms"])
    m["ref_ms"] = 1e3 * statistics.median(ref["times"])
    m["vs_single"] = m["ms"] / m["ref_ms"]
    if base is not None:
        base_steps = list(zip(*[r[(f"tp{world['size']}", B)]["times"] for r in world["ranks"]]))
        m["base_ms"] = statistics.median([1e3 * max(t) for t in base_steps])
        m["vs_tp"] = m["ms"] / m["base_ms"]
    m["setup_s"] = max(x["setup_s"] for x in ranks)  # parallelize(), once per scheme (shared by the batches)
    m["compile_s"] = max(x["compile_s"] for x in ranks)  # prefill + warmup steps (compiles) of this batch
    m["recompiles"] = max(x["recompiles"] for x in ranks)
    m["notes"] = []
    # graphs: exactly one compiled by the prefill and one by the first decode step of this batch
    for phase in ("prefill", "decode"):
        got = {len(x[phase][0]) for x in ranks}
        if got != {1}:
            m["notes"].append(f"{phase}: {sorted(got)} graph(s) compiled per rank (expected 1); its counts are not read")
    if any(len(x["decode"][0]) != 1 or len(x["prefill"][0]) != 1 for x in ranks):
        return m | dict(incomplete=True)
    dec, pre = ranks[0]["decode"][0][0], ranks[0]["prefill"][0][0]
    m["ffn_tokens"] = [x["decode"][0][0]["ffn_tokens"] for x in ranks]  # per rank, per layer
    m["ffn_tokens_prefill"] = [x["prefill"][0][0]["ffn_tokens"] for x in ranks]
    m["ffn_expected"] = [_expected_ffn_tokens(s, B, x["dp_rank"], 1) for x in ranks]
    m["ffn_expected_prefill"] = [_expected_ffn_tokens(s, B, x["dp_rank"], a.scheme_context) for x in ranks]
    m["T"] = B
    per_layer, per_step, same = _per_layer(ranks[0]["decode"][1][0], a.layers)
    if not same:
        m["notes"].append("the layers' collectives differ; per-layer columns are the mean over layers")
    m["coll_layer"] = {k: v[0] for k, v in per_layer.items()}
    m["bytes_layer"] = {k: v[1] for k, v in per_layer.items()}
    m["coll_step"] = {k: v[0] for k, v in per_step.items()}
    m["bytes_step"] = {k: v[1] for k, v in per_step.items()}
    total = {k: round(m["coll_layer"][k] * a.layers + m["coll_step"][k]) for k in KINDS}
    total_b = {k: round(m["bytes_layer"][k] * a.layers + m["bytes_step"][k]) for k in KINDS}
    m["coll_total"], m["bytes_total"] = total, total_b
    if total != {k: dec["collectives"].get(k, 0) for k in KINDS} or total_b != {k: dec["collective_bytes"].get(k, 0) for k in KINDS}:
        m["notes"].append(f"by-layer attribution {total} / {total_b} B disagrees with the pass report "
                          f"{dec['collectives']} / {dec['collective_bytes']} B")
    p = ranks[0]["profile"]
    if p is not None:
        ns = a.profiled
        m["rt_counts"] = {k: p["graph"][k] / ns for k in KINDS}  # per step
        m["rt_bytes"] = sum(p["graph_bytes"].values()) / ns
        m["outside_per_step"] = outside_graph(p, ns)
        m["gloo_rs_as_ar"] = p["gloo"]["reduce_scatter"] == 0 and p["graph"]["reduce_scatter"] > 0
        m["profile_names"] = p["names"]
    m["prefill_collectives"] = dict(pre["collectives"])
    # tokens: every rank's greedy tokens (prefill + every decode step) against the single device's
    bad = [x["rank"] for x in ranks if not torch.equal(x["tokens"], ref["tokens"])]
    m["mismatch_ranks"] = bad
    m["ref_min_gap"] = min(ref["gaps"])
    if bad:
        x = next(r for r in ranks if r["rank"] == bad[0])
        if x["tokens"].shape != ref["tokens"].shape:
            m["first_mismatch"] = dict(rank=bad[0], shape=tuple(x["tokens"].shape), expected=tuple(ref["tokens"].shape))
        else:
            d = (x["tokens"] != ref["tokens"]).nonzero()
            m["first_mismatch"] = dict(rank=bad[0], row=int(d[0, 0]), step=int(d[0, 1]), n=int(len(d)))
    m["per_rank"] = [dict(rank=x["rank"], dp_rank=x["dp_rank"], tp_rank=x["tp_rank"], cp_rank=x["cp_rank"], rows=x["rows"],
                          kv_bytes=x["kv_bytes"], weight_bytes=x["weight_bytes"]) for x in ranks]
    return m


def _range(xs, fmt) -> str:
    lo, hi = min(xs), max(xs)
    return fmt(hi) if lo == hi else f"{fmt(hi)}/{fmt(lo)}"


def _ffn_cell(m) -> str:
    if "ffn_tokens" not in m:
        return "n/a"
    vals = sorted({t for per in m["ffn_tokens"] for t in per}, reverse=True)
    return f"{'/'.join(map(str, vals))} (T={m['T']})"


def _schemes_in_order(a) -> list[Scheme]:
    """The schemes part's rows: per rank count, the single device, tp<n>, then the others as given."""
    out = []
    for n in sorted({s.ranks for s in a.scheme_list}):
        base = f"tp{n}"
        out.append(next((s for s in a.scheme_list if s.name == base), parse_scheme(base)))
        out.extend(s for s in a.scheme_list if s.ranks == n and s.name != base)
    return out


def report_schemes(a, sres: dict) -> tuple[str, str, bool]:
    """The schemes table, the goal lines, and whether every check passed."""
    hdr = (f"{'scheme':<13}|{'ranks':>5} |{'B':>3} |{'rows/replica':>12} |{'KV/rank':>11} |{'KV frac':>13} |{'W/rank':>9} "
           f"|{'W frac':>7} |{'FFN tok/rank/step':>17} |{'coll/layer/step':>15} |{'B/layer/step':>12} "
           f"|{'+once/step':>10} |{'+B/step':>8} |{'outside/step':>12} |{'ms/token':>9} |{'min ms':>7} "
           f"|{'vs 1 dev':>8} |{'vs tp-only':>10} | tokens")
    lines = [f"schemes: decode, 1 token per row per step, prompt {a.scheme_context}, CPU, lowering={a.lowering}, "
             f"combine={a.combine}; dp_inputs='global'; references timed interleaved in the same world", hdr, "-" * len(hdr)]
    rows, ok = [], True
    for B in a.batch_list:
        for n in sorted({s.ranks for s in a.scheme_list}):
            world = sres.get(n)
            if world is None:
                continue
            if not world["ok"]:
                lines.append(f"{n}-rank world, B={B}: FAILED: {world['error']}")
                ok = False
                continue
            for s in [SINGLE] + _schemes_in_order(a):
                if s is not SINGLE and s.ranks != n:
                    continue
                m = _scheme_metrics(a, world, s, B)
                rows.append(m)
                label = f"1 device (w{n})" if s is SINGLE else s.name
                kv = _range(m["kv_bytes"], lambda v: f"{v / 1024:.1f}K")
                kvf = _range(m["kv_frac"], lambda v: f"{v:.3f}")
                wb = _range(m["weight_bytes"], lambda v: f"{v / 1024:.0f}K")
                wf = _range(m["w_frac"], lambda v: f"{v:.3f}")
                if m.get("incomplete"):
                    coll = bl = once = bs = "n/a"
                else:
                    coll = _fmt_counts(m["coll_layer"], 1)
                    bl = _fmt_bytes(sum(m["bytes_layer"].values()))
                    once = _fmt_counts(m["coll_step"], 1)
                    bs = _fmt_bytes(sum(m["bytes_step"].values()))
                outside = _fmt_counts(m["outside_per_step"], 1) if "outside_per_step" in m else "-"
                vs_tp = f"{m['vs_tp']:.2f}x" if "vs_tp" in m else "n/a"
                if m.get("mismatch_ranks"):
                    tok = f"MISMATCH ranks {m['mismatch_ranks']} {m['first_mismatch']}"
                    ok = False
                else:
                    tok = "match" if s is not SINGLE else "reference"
                lines.append(
                    f"{label:<13}|{m['ranks']:>5} |{B:>3} |{'+'.join(map(str, m['rows'])):>12} |{kv:>11} |{kvf:>13} |{wb:>9} "
                    f"|{wf:>7} |{_ffn_cell(m):>17} |{coll:>15} |{bl:>12} |{once:>10} |{bs:>8} |{outside:>12} "
                    f"|{m['ms']:>9.2f} |{m['ms_min']:>7.2f} |{m['vs_single']:>7.2f}x |{vs_tp:>10} | {tok}")
        lines.append("")
    lines.append(
        "columns: rows/replica = the global batch's rows per dp replica; KV/rank, W/rank = KVCache.kv_bytes() (sink slot "
        "included) and cpcompile.sharding.weight_bytes of a rank (a/b: largest/smallest over the ranks); KV frac, W frac "
        "= those over the single device's; FFN tok/rank/step = tokens one rank's FFN processes per decode step (the decode "
        "graph's counts['ffn_tokens'], padding included; a/b over ranks), T = the batch's tokens per step; coll/layer/step, "
        "B/layer/step = collectives (AR all_reduce, A2A all_to_all, AG all_gather, RS reduce_scatter) and the bytes they "
        "send (their input tensors) per decoder layer per decode step; +once/step, +B/step = those issued once per step "
        "outside the layers (logits all-gather of dp, all-gather before the LM head of sp); outside/step = gloo "
        "collectives per step outside the compiled graph (the wrapper's input checksum), from the profiler; ms/token = "
        "median over the timed steps of the slowest rank's forward+argmax for the whole batch; min ms = fastest step; vs 1 "
        "dev, vs tp-only = that over the single device's / tp<ranks>'s median, timed interleaved in the same world; "
        "tokens = every rank's greedy tokens vs the single device's.")
    return "\n".join(lines), rows, ok


def scheme_goals(a, rows: list, sres: dict) -> tuple[str, bool]:
    s, ok = [], True

    def goal(name: str, results: list[tuple[bool, str]], empty: str):
        nonlocal ok
        if not results:
            s.append(f"goal: {name}: not measured ({empty})")
            return
        good = all(r for r, _ in results)
        ok &= good
        s.append(f"goal: {name}: {'MET' if good else 'NOT MET'} ({'; '.join(t for _, t in results)})")

    by_key = {(m["scheme"], m["batch"]): m for m in rows}
    par = [m for m in rows if m["scheme"] != SINGLE.name]
    goal("every scheme's greedy tokens (prefill + every decode step, every rank) == the single device's",
         [(not m["mismatch_ranks"], f"{m['scheme']}@B{m['batch']}" + ("" if not m["mismatch_ranks"] else
          f" MISMATCH {m['first_mismatch']} (single device's smallest top-1/top-2 gap {m['ref_min_gap']:.2e})"))
          for m in par], "no scheme ran")
    same = []
    for B in a.batch_list:
        toks = [(n, w["ranks"][0][(SINGLE.name, B)]["tokens"]) for n, w in sorted(sres.items()) if w["ok"]]
        if len(toks) > 1:
            same.append((all(torch.equal(t, toks[0][1]) for _, t in toks), f"B{B}: {len(toks)}-world(s) " + "/".join(str(n) for n, _ in toks)))
    goal("the single-device reference gives the same tokens in every world", same, "one world only")
    sp = [m for m in par if m["ffn"] == "sp" and m["cp"] > 1 and "ffn_tokens" in m]
    goal("FFN tokens per rank under ffn='sp' == ceil(T/cp), not T (decode; prefill: ceil(B*prompt/cp))",
         [(all(t == e for per, e in zip(m["ffn_tokens"], m["ffn_expected"]) for t in per)
           and all(t == e for per, e in zip(m["ffn_tokens_prefill"], m["ffn_expected_prefill"]) for t in per),
           f"{m['scheme']}@B{m['batch']}: decode {_range([t for p in m['ffn_tokens'] for t in p], str)} vs "
           f"ceil({m['T']}/{m['cp']}) = {max(m['ffn_expected'])}, T = {m['T']}; prefill "
           f"{_range([t for p in m['ffn_tokens_prefill'] for t in p], str)} vs {max(m['ffn_expected_prefill'])}")
          for m in sp], "no ffn='sp' scheme with cp > 1 ran")
    other = [m for m in par if "ffn_tokens" in m and not (m["ffn"] == "sp" and m["cp"] > 1)]
    goal("FFN tokens per rank as the layout says (tp: the replica's tokens; world_tp: dp x the largest replica's)",
         [(all(t == e for per, e in zip(m["ffn_tokens"], m["ffn_expected"]) for t in per),
           f"{m['scheme']}@B{m['batch']}: {_range([t for p in m['ffn_tokens'] for t in p], str)} vs "
           f"{_range(m['ffn_expected'], str)}") for m in other], "no scheme ran")
    kv, no_ref = [], []
    for m in par:
        if m["dp"] == 1:
            continue
        ref = next((r for r in par if r["dp"] == 1 and (r["tp"], r["cp"]) == (m["tp"], m["cp"]) and r["batch"] == m["batch"]), None)
        if ref is None and (m["tp"], m["cp"]) == (1, 1):
            ref = by_key.get((SINGLE.name, m["batch"]))
            ref_ranks = {(0, 0): ref["per_rank"][0]} if ref else {}
        else:
            ref_ranks = {(x["tp_rank"], x["cp_rank"]): x for x in ref["per_rank"]} if ref else {}
        if ref is None:
            no_ref.append(f"{m['scheme']} (add tp{m['tp']}xcp{m['cp']})")
            continue
        fr = [f"{x['kv_bytes']}/{ref_ranks[(x['tp_rank'], x['cp_rank'])]['kv_bytes']} = {x['rows']}/{m['batch']}"
              for x in m["per_rank"]]
        good = all(x["rows"] == m["rows"][x["dp_rank"]]
                   and x["kv_bytes"] * m["batch"] == x["rows"] * ref_ranks[(x["tp_rank"], x["cp_rank"])]["kv_bytes"]
                   for x in m["per_rank"])
        kv.append((good, f"{m['scheme']}@B{m['batch']} vs {ref['scheme']}: " + ", ".join(sorted(set(fr)))))
    goal("KV bytes per rank under dp == rows_d/B of the dp=1 run with the same tp x cp (same tp_rank, cp_rank), exactly",
         kv, "no dp scheme ran with its dp=1 reference")
    if no_ref:
        s.append(f"  (KV not compared for {', '.join(sorted(set(no_ref)))}: no dp=1 run with the same tp x cp in --schemes)")
    rt = [m for m in par if "rt_counts" in m and "coll_total" in m]
    goal("collectives per decode step seen by the profiler == the decode graph's",
         [(m["rt_counts"] == {k: float(v) for k, v in m["coll_total"].items()}
           and abs(m["rt_bytes"] - sum(m["bytes_total"].values())) < 0.5,
           f"{m['scheme']}@B{m['batch']}: {_fmt_counts(m['rt_counts'], 1)}" + (
               "" if m["rt_counts"] == {k: float(v) for k, v in m["coll_total"].items()} else
               f" vs graph {_fmt_counts(m['coll_total'], 1)}")) for m in rt], "no profiled steps")
    goal("no graph compiled during the timed and profiled steps",
         [(m["recompiles"] == 0, f"{m['scheme']}@B{m['batch']}: {m['recompiles']}") for m in rows if m["recompiles"]]
         or [(True, "0 for every scheme and batch")], "")
    rs = sorted({m["scheme"] for m in rows if m.get("gloo_rs_as_ar")})
    if rs:
        s.append(f"info: gloo has no reduce-scatter; c10d runs each graph reduce_scatter as one gloo all_reduce of the "
                 f"whole input ({', '.join(rs)}): on this backend an RS moves all-reduce traffic, not 1/n of it")
    for m in rows:
        for note in m["notes"]:
            s.append(f"NOTE {m['scheme']}@B{m['batch']}: {note}")
            ok = False
    s.append(f"NOTE: {os.cpu_count()} cores, 1 thread per rank, gloo over loopback: the ranks of a world share the "
             "cores (4 ranks oversubscribe 2 cores), so time ratios are overheads (collectives, scheduling), not speed-up.")
    return "\n".join(s), ok


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

"""Serving benchmark on CPU: one stream of generate() requests through HF eager, torch.compile with
HF's static cache, and cpcompile, on one device and on a tp x cp gloo mesh.

    python benchmarks/bench_serving.py --quick                       # 12 requests, prompts 16..512, aot_eager
    python benchmarks/bench_serving.py --quick --lowering inductor   # the same with Inductor (~45 s a graph on 2 busy cores)
    python benchmarks/bench_serving.py --requests 40 --max-prompt 2048 --json /tmp/serving.json
    python benchmarks/bench_serving.py --skip-parallel --contenders hf-eager,cpcompile --lowering aot_eager
    python benchmarks/bench_serving.py                               # the issue's stream: 100 requests, prompts 16..4096

The stream (seeded, `make_stream`): `--requests` calls of
`model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
pad_token_id=0, output_logits=True, return_dict_in_generate=True)` with `n = --new-tokens`; each
call has a batch drawn uniformly from 1 .. `--max-batch` and a prompt width drawn log-uniformly from
`--min-prompt` .. `--max-prompt`; one row per call has the full width, each other row is
left-padded (by a uniform 1 .. width-1 tokens) with probability `--pad-fraction`.

Model: a small Llama from a seeded `LlamaConfig` (default 2 layers, hidden 256, 8 heads, 2 KV
heads, intermediate 512, vocab 1024), fp32, eval; every contender is a deep copy of it.

Contenders on one device (the main process, default torch threads), in the order of `--contenders`:

  hf-eager              `generate()` as is: DynamicCache, no compile. The reference for tokens.
  torch.compile+static  `m.forward = torch.compile(m.forward, fullgraph=True, dynamic=False)`
                        (backend `--lowering`, Inductor by default) and `generate(..., cache_implementation="static",
                        max_cache_len=max_length)`: HF's static cache sized once for the whole
                        stream (transformers' knob against a re-allocation, and so a recompile,
                        per call). Prefill and decode both run compiled, so every new (batch,
                        prompt width) is a graph: Dynamo's recompile limit (8) ends it. The
                        benchmark catches the error, records the request and goes on without it.
  hf-autocompile        transformers' own compile path in `generate()`: the same static cache and
                        `compile_config=CompileConfig()` (its defaults: fullgraph=False,
                        dynamic=None, i.e. Dynamo's automatic dynamic shapes), with
                        `_compile_all_devices=True` (transformers compiles only on accelerators
                        otherwise); backend `--lowering` (mode None unless Inductor). transformers
                        compiles the decode step only; prefill runs eager.
  cpcompile             `cpcompile.parallelize(m, max_length=max_prompt + n, prefill_chunk=,
                        max_batch=, lowering=)` (tp = cp = 1), called before anything else is
                        compiled (it resets Dynamo).

The requests are interleaved: each request runs through every contender before the next, the
order rotated by one per request, so machine load is shared. Then, unless `--skip-parallel`, the
same stream runs through cpcompile with `tp=--tp, cp=--cp` on a `cpcompile.testing.World` of
tp*cp gloo ranks (one intra-op thread per rank; ranks share the cores), `--new-tokens` the same.

How each figure is measured (the same way for every contender): the function `generate()` calls
for prefill and decode steps (`model.forward`, or for hf-autocompile also the compiled call it
gets from `get_compiled_call`) is wrapped by a timer (`Timer`, `time.perf_counter`), which records
every call: prefill (the first call of a request) or decode (the rest, one token per row), and how
many graphs Dynamo compiled during it (`counters["stats"]["unique_graphs"]` before and after).

  graphs          graphs Dynamo compiled during the stream; for cpcompile also checked against
                  the engine's count (`model._cpcompile.graphs`), one per shape key
                  (`engine.compiles`), and shown beside `serving.generate_graph_bound(max_batch,
                  prefill_chunk)`. On the mesh: per rank.
  compile s       total wall time of the forward calls during which a graph was compiled (each
                  call's own run time included: an upper bound on compile time). Inductor's
                  on-disk caches are pointed at a fresh directory (cold compiles) unless
                  `--warm-cache`. cpcompile's `parallelize()` setup is reported apart (setup s).
  stream s        wall time of all generate() calls of the requests this contender finished.
  prefill tok/s   real prompt tokens (attention_mask sum: left padding, bucket rows and chunk
                  padding not counted) / time, over the prefill calls that compiled nothing.
  decode ms/tok   decode time / tokens generated by decode steps (rows x (n - 1) per request),
                  over the decode calls that compiled nothing. Bucket rows are not counted.
  x eager         hf-eager's time on exactly the same (non-compiling) calls over this
                  contender's: > 1 is faster than eager.
  tokens          greedy tokens against hf-eager's, request by request and row by row: a row's
                  first differing token is a near-tie when hf-eager's top-1 minus top-2 logit
                  at that step is < 1e-3 (as tests/test_serving.py), otherwise a mismatch.

On the mesh a call's time is the slowest rank's (every rank runs the same calls in lockstep; a
barrier starts each request) and a call compiled if it did on any rank.

Exit status 1 if cpcompile (either run) fails, differs from hf-eager without a near-tie on any
request, or compiles more graphs than the bound (or more than one per shape key).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import traceback

# Cold compile by default, as bench_decode.py: Inductor's on-disk caches would make a second run's
# "compile s" a fraction of the first. Set before torch is imported; the World's ranks inherit it.
if "--warm-cache" not in sys.argv and __name__ == "__main__":
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_serving_inductor_")

import torch

from _machine import cpu_model

CONTENDERS = ("hf-eager", "torch.compile+static", "hf-autocompile", "cpcompile")
DEFAULT_CONTENDERS = ",".join(CONTENDERS)
NEAR_TIE = 1e-3  # top-1 minus top-2 logit below which a different greedy token is not a mismatch
QUICK = dict(requests=12, max_prompt=512, lowering="aot_eager")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--requests", type=int, default=100, help="generate() calls in the stream")
    p.add_argument("--min-prompt", type=int, default=16, help="shortest prompt width (log-uniform draw)")
    p.add_argument("--max-prompt", type=int, default=4096, help="longest prompt width (log-uniform draw)")
    p.add_argument("--max-batch", type=int, default=8, help="batch sizes are drawn from 1..this; cpcompile's max_batch")
    p.add_argument("--pad-fraction", type=float, default=0.3, help="chance that a row (other than one full-width row) is left-padded")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated per request")
    p.add_argument("--prefill-chunk", type=int, default=256, help="cpcompile's prefill_chunk")
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                   help=f"comma list of single-device contenders, from {', '.join(CONTENDERS)} (hf-eager, the reference, always runs)")
    p.add_argument("--lowering", default=None, choices=["inductor", "aot_eager"],
                   help="cpcompile's lowering and the other compiled contenders' backend (default inductor; "
                        "aot_eager with --quick)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the mesh run")
    p.add_argument("--cp", type=int, default=2, help="context-parallel size of the mesh run")
    p.add_argument("--skip-parallel", action="store_true", help="no mesh run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds the mesh run may take before its world is torn down")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk compile caches (default: a fresh empty dir)")
    p.add_argument("--quick", action="store_true", help=f"shorter run: {QUICK}, unless given explicitly (Inductor "
                   "compiles take ~45 s a graph on 2 busy cores; aot_eager a few)")
    p.add_argument("--json", metavar="PATH", default="", help="write the numbers here")
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    a.lowering = a.lowering or "inductor"
    names = [x for x in a.contenders.split(",") if x]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        p.error(f"--contenders: unknown {unknown}; expected some of {', '.join(CONTENDERS)}")
    a.contender_list = ["hf-eager"] + [x for x in CONTENDERS[1:] if x in names]
    if not 1 <= a.min_prompt <= a.max_prompt:
        p.error(f"--min-prompt {a.min_prompt} and --max-prompt {a.max_prompt}: expected 1 <= min <= max")
    if a.new_tokens < 2:
        p.error(f"--new-tokens {a.new_tokens}: expected at least 2 (one prefill, then decode steps)")
    a.max_length = a.max_prompt + a.new_tokens
    return a


# ----------------------------------------------------------------------------- model, stream, timing


def build_model(a: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=a["vocab"],
        hidden_size=a["hidden"],
        intermediate_size=a["intermediate"],
        num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"],
        num_key_value_heads=a["kv_heads"],
        max_position_embeddings=max(4096, a["max_length"]),
        tie_word_embeddings=False,
    )
    torch.manual_seed(a["seed"])
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def make_stream(a: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The requests: (ids [B, W] with 0 at left padding, mask [B, W]), the same on every call and rank."""
    rng = random.Random(a["seed"])
    lo, hi = math.log(a["min_prompt"]), math.log(a["max_prompt"])
    stream = []
    for _ in range(a["requests"]):
        batch = rng.randint(1, a["max_batch"])
        width = min(a["max_prompt"], max(a["min_prompt"], round(math.exp(rng.uniform(lo, hi)))))
        pads = [0] + [rng.randint(1, width - 1) if width > 1 and rng.random() < a["pad_fraction"] else 0
                      for _ in range(batch - 1)]
        rng.shuffle(pads)
        g = torch.Generator().manual_seed(rng.randint(0, 2**31 - 1))
        ids = torch.randint(3, a["vocab"], (batch, width), generator=g)
        mask = (torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]).long()
        stream.append((ids.masked_fill(mask == 0, 0), mask))
    return stream


def generate(model, ids: torch.Tensor, mask: torch.Tensor, new: int, **extra):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True, **extra)


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Timer:
    """Times every forward call `generate()` makes: `wrap(fn)` returns the timed fn.

    A call inside another timed call, or while Dynamo traces the wrapper (hf-autocompile compiles
    `__call__`, which calls the timed forward), runs untimed: only the outermost call is recorded."""

    def __init__(self):
        self.calls: list[dict] = []  # request, kind ('prefill' | 'decode'), tokens, s, graphs
        self._request: tuple[int, int, int] | None = None  # index, real prompt tokens, rows
        self._first = False
        self._depth = 0

    def begin(self, request: int, mask: torch.Tensor) -> None:
        self._request = (request, int(mask.sum()), mask.shape[0])
        self._first = True

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if torch.compiler.is_compiling() or self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            before = dynamo_graphs()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                s = time.perf_counter() - t0
                self._depth -= 1
                i, prompt_tokens, rows = self._request
                kind = "prefill" if self._first else "decode"
                self.calls.append(dict(request=i, kind=kind, tokens=prompt_tokens if self._first else rows, s=s,
                                       graphs=dynamo_graphs() - before))
                self._first = False

        return timed


def merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """One call list from every rank's: the slowest rank's time; compiled if any rank compiled."""
    if len({len(c) for c in per_rank}) != 1:
        raise RuntimeError(f"ranks made different numbers of forward calls: {[len(c) for c in per_rank]}")
    return [dict(calls[0], s=max(c["s"] for c in calls), graphs=max(c["graphs"] for c in calls))
            for calls in zip(*per_rank)]


def _by_call(calls: list[dict]):
    """(request, call number) -> call; call 0 of a request is its prefill, 1.. its decode steps."""
    seen: dict[int, int] = {}
    for c in calls:
        j = seen[c["request"]] = seen.get(c["request"], -1) + 1
        yield (c["request"], j), c


def summarize(calls: list[dict], ref_calls: list[dict] | None) -> dict:
    """graphs, compile s, prefill tok/s, decode ms/token from a contender's calls, and its speed
    against the reference's time on the very same (non-compiling) calls."""
    ref_s = {key: c["s"] for key, c in _by_call(ref_calls or [])}
    out = dict(graphs=sum(c["graphs"] for c in calls), compile_calls=sum(1 for c in calls if c["graphs"]),
               compile_s=sum(c["s"] for c in calls if c["graphs"]))
    for kind in ("prefill", "decode"):
        timed = [(key, c) for key, c in _by_call(calls) if c["kind"] == kind and not c["graphs"]]
        out[f"{kind}_calls"] = len(timed)
        out[f"{kind}_tokens"] = sum(c["tokens"] for _, c in timed)
        out[f"{kind}_s"] = sum(c["s"] for _, c in timed)
        s_ref = sum(ref_s.get(key, float("nan")) for key, _ in timed)
        out[f"{kind}_vs_ref"] = s_ref / out[f"{kind}_s"] if timed and ref_calls is not None else float("nan")
    out["prefill_tok_s"] = out["prefill_tokens"] / out["prefill_s"] if out["prefill_calls"] else float("nan")
    out["decode_ms_per_token"] = 1e3 * out["decode_s"] / out["decode_tokens"] if out["decode_calls"] else float("nan")
    return out


def compare_tokens(ref: dict, got: dict) -> dict:
    """Rows whose greedy tokens differ from the reference's: near-ties (top-2 gap < NEAR_TIE) and mismatches."""
    mismatches, near_ties, rows = [], [], 0
    for i, tokens in got.items():
        want, gaps = ref["tokens"][i], ref["gaps"][i]  # [B, n], [n, B]
        for b in range(want.shape[0]):
            rows += 1
            diff = (tokens[b] != want[b]).nonzero()
            if len(diff):
                t = int(diff[0])
                gap = float(gaps[t, b])
                (near_ties if gap < NEAR_TIE else mismatches).append(dict(request=i, row=b, step=t, ref_gap=gap))
    return dict(rows=rows, mismatches=mismatches, near_ties=near_ties)


# ----------------------------------------------------------------------------- the mesh run, on every rank


def serve_rank(a: dict) -> dict:
    """The stream through cpcompile on this rank's share of a tp x cp mesh; rank 0 also runs it
    through hf-eager (one thread, while the other ranks wait), interleaved request by request, so
    the mesh's 'x eager' compares runs made under the same load."""
    import torch.distributed as dist
    import transformers

    from cpcompile import parallelize

    transformers.logging.set_verbosity_error()
    rank = dist.get_rank()
    model = build_model(a)
    eager = copy.deepcopy(model) if rank == 0 else None
    t0 = time.perf_counter()
    parallelize(model, tp=a["tp"], cp=a["cp"], max_length=a["max_length"], prefill_chunk=a["prefill_chunk"],
                max_batch=a["max_batch"], lowering=a["lowering"])
    setup_s = time.perf_counter() - t0
    timer, eager_timer = Timer(), Timer()
    model.forward = timer.wrap(model.forward)
    if eager is not None:
        eager.forward = eager_timer.wrap(eager.forward)
        eager_timer.begin(-1, torch.ones(1, 1))
        warm_up(eager)
        eager_timer.calls.clear()
    tokens, wall = {}, {}
    stream = make_stream(a)
    for i, (ids, mask) in enumerate(stream):
        for run_mesh in ((True, False) if i % 2 else (False, True)):  # who goes first alternates
            if run_mesh:
                dist.barrier()  # every rank starts the request together (not timed)
                timer.begin(i, mask)
                t0 = time.perf_counter()
                out = generate(model, ids, mask, a["new_tokens"])
                wall[i] = time.perf_counter() - t0
                tokens[i] = out.sequences[:, ids.shape[1]:]
            elif eager is not None:
                eager_timer.begin(i, mask)
                generate(eager, ids, mask, a["new_tokens"])
        if rank == 0:
            print(f"  [tp{a['tp']}xcp{a['cp']}] request {i + 1}/{len(stream)} B={ids.shape[0]} W={ids.shape[1]}: "
                  f"{wall[i]:.2f} s, graphs {model._cpcompile.graphs}", flush=True)
    state = model._cpcompile
    return dict(rank=rank, setup_s=setup_s, calls=timer.calls, eager_calls=eager_timer.calls, wall=wall, tokens=tokens,
                graphs=state.graphs, compiles={str(k): v for k, v in state.engine.compiles.items()})


# ----------------------------------------------------------------------------- one device


class Contender:
    """One way of running the stream: a model, the generate() extras, its timer and results."""

    def __init__(self, name: str, model, extra: dict, timer: Timer):
        self.name, self.model, self.extra, self.timer = name, model, extra, timer
        self.tokens: dict[int, torch.Tensor] = {}  # request -> [B, n] generated tokens
        self.gaps: dict[int, torch.Tensor] = {}  # request -> [n, B] top-1 minus top-2 logit (reference only)
        self.wall: dict[int, float] = {}  # request -> generate() seconds
        self.failure: dict | None = None


def make_contenders(a, base) -> tuple[list[Contender], float]:
    """Deep copies of `base`, prepared as each contender needs; cpcompile's parallelize first."""
    from transformers import CompileConfig

    from cpcompile import parallelize

    models = {name: copy.deepcopy(base) for name in a.contender_list}
    setup_s = float("nan")
    if "cpcompile" in models:  # first: parallelize() resets Dynamo, which would drop graphs compiled before it
        t0 = time.perf_counter()
        parallelize(models["cpcompile"], max_length=a.max_length, prefill_chunk=a.prefill_chunk, max_batch=a.max_batch,
                    lowering=a.lowering)
        setup_s = time.perf_counter() - t0
    out = []
    for name, m in models.items():
        timer, extra = Timer(), {}
        if name == "torch.compile+static":
            m.forward = torch.compile(m.forward, backend=a.lowering, fullgraph=True, dynamic=False)
            extra = dict(cache_implementation="static", max_cache_len=a.max_length)
        if name == "hf-autocompile":
            config = CompileConfig()  # transformers' defaults (mode='reduce-overhead': Inductor only)
            if a.lowering != "inductor":
                config.backend, config.mode = a.lowering, None
            config._compile_all_devices = True  # else transformers compiles only on accelerators
            extra = dict(cache_implementation="static", max_cache_len=a.max_length, compile_config=config)
            compiled_call = m.get_compiled_call  # decode steps go through this; prefill through forward
            m.get_compiled_call = lambda cfg, _get=compiled_call, _t=timer: _t.wrap(_get(cfg))
        m.forward = timer.wrap(m.forward)
        out.append(Contender(name, m, extra, timer))
    return out, setup_s


def warm_up(model) -> None:
    """One untimed 16-token request through an eager model: its first call in a process pays one-time
    initialisation (allocator, kernels' first use) that compiled contenders pay inside compile calls."""
    generate(model, torch.full((1, 16), 5), torch.ones(1, 16, dtype=torch.long), 2)


def run_single(a, stream, contenders: list[Contender]) -> None:
    ref = contenders[0]
    ref.timer.begin(-1, torch.ones(1, 1))
    warm_up(ref.model)
    ref.timer.calls.clear()
    for i, (ids, mask) in enumerate(stream):
        k = i % len(contenders)
        line = []
        for c in contenders[k:] + contenders[:k]:  # rotate who goes first
            if c.failure is not None:
                continue
            c.timer.begin(i, mask)
            before = dynamo_graphs()
            t0 = time.perf_counter()
            try:
                out = generate(c.model, ids, mask, a.new_tokens, **c.extra)
            except Exception as e:  # noqa: BLE001 -- a contender's failure is a result; the others go on
                c.failure = dict(request=i, batch=ids.shape[0], width=ids.shape[1], error=_error_line(e),
                                 graphs=dynamo_graphs() - before, traceback=traceback.format_exc()[-4000:])
                c.timer.calls = [x for x in c.timer.calls if x["request"] != i]
                line.append(f"{c.name} FAILED ({c.failure['error'][:80]})")
                continue
            c.wall[i] = time.perf_counter() - t0
            c.tokens[i] = out.sequences[:, ids.shape[1]:]
            if c is ref:
                top2 = torch.stack(out.logits).topk(2, dim=-1).values  # [n, B, 2]
                c.gaps[i] = top2[..., 0] - top2[..., 1]
            graphs = dynamo_graphs() - before
            line.append(f"{c.name} {c.wall[i]:.2f} s" + (f" (+{graphs} graphs)" if graphs else ""))
        print(f"  request {i + 1}/{len(stream)} B={ids.shape[0]} W={ids.shape[1]}: " + " | ".join(sorted(line)), flush=True)


def _error_line(e: BaseException) -> str:
    first = next((l for l in str(e).strip().splitlines() if l.strip()), "")
    return f"{type(e).__name__}: {first}"


def _last_error_line(tb: str) -> str:
    lines = [l for l in tb.strip().splitlines() if l.strip()]
    for l in reversed(lines):  # the exception line: after the last frame, skipping torch's hints
        if l.startswith(("Set TORCHDYNAMO_VERBOSE", "You can suppress", "import torch._dynamo", "For more information")):
            continue
        if ":" in l and not l.startswith(" "):
            return l.strip()
    return lines[-1].strip() if lines else "?"


# ----------------------------------------------------------------------------- report


def _x(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}x"


def _f(v: float, fmt: str) -> str:
    return "-" if math.isnan(v) else format(v, fmt)


def report(a, rows: list[dict], n: int) -> str:
    hdr = (f"{'contender':<22}| {'done':>7} | {'graphs':>9} | {'bound':>5} | {'compile s':>9} | {'stream s':>8} | "
           f"{'prefill tok/s':>13} | {'x eager':>7} | {'decode ms/tok':>13} | {'x eager':>7} | tokens vs hf-eager")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        s, t = r["summary"], r["tokens"]
        if r["name"] == "hf-eager":
            tok = "(reference)"
        elif t is None:
            tok = "-"
        else:
            tok = f"{t['rows'] - len(t['mismatches']) - len(t['near_ties'])}/{t['rows']} rows equal"
            if t["near_ties"]:
                tok += f", {len(t['near_ties'])} near-tie"
            if t["mismatches"]:
                tok += f", {len(t['mismatches'])} MISMATCH"
        graphs = r["graphs_text"]
        lines.append(
            f"{r['name']:<22}| {r['done']:>3}/{n:<3} | {graphs:>9} | {r['bound']:>5} | {s['compile_s']:>9.1f} | "
            f"{r['stream_s']:>8.1f} | {_f(s['prefill_tok_s'], '.0f'):>13} | {_x(s['prefill_vs_ref']):>7} | "
            f"{_f(s['decode_ms_per_token'], '.2f'):>13} | {_x(s['decode_vs_ref']):>7} | {tok}"
        )
    return "\n".join(lines)


def single_rows(contenders: list[Contender], bound: int, setup_s: float) -> tuple[list[dict], list[str], bool]:
    """The table rows of the one-device contenders; notes and ok-ness of cpcompile's checks."""
    ref = contenders[0]
    ref_result = dict(tokens=ref.tokens, gaps=ref.gaps)
    rows, notes, ok = [], [], True
    for c in contenders:
        s = summarize(c.timer.calls, None if c is ref else ref.timer.calls)
        if c.failure is not None:  # graphs compiled by the failed request (e.g. its prefill) count too
            s["graphs"] += c.failure["graphs"]
        row = dict(name=c.name, done=len(c.wall), summary=s, stream_s=sum(c.wall.values()), failure=c.failure,
                   tokens=None if c is ref else compare_tokens(ref_result, c.tokens), bound="-",
                   graphs_text=str(s["graphs"]), wall=c.wall)
        if c.name == "cpcompile":
            state = c.model._cpcompile
            row.update(bound=str(bound), engine_graphs=state.graphs,
                       compiles={str(k): v for k, v in state.engine.compiles.items()}, setup_s=setup_s)
            if state.graphs > bound or set(state.engine.compiles.values()) - {1} or state.graphs != s["graphs"]:
                ok = False
                notes.append(f"GRAPHS: cpcompile compiled {state.graphs} graphs (Dynamo counted {s['graphs']}), bound "
                             f"{bound}, per shape key {sorted(set(state.engine.compiles.values()))}")
            ok &= c.failure is None and not row["tokens"]["mismatches"]
        rows.append(row)
    return rows, notes, ok


def mesh_row(a, par: dict, ref: Contender, bound: int) -> tuple[dict, list[str], bool]:
    """The table row of the mesh run (`par`: the World's results or its failure)."""
    name = f"cpcompile tp{a.tp}xcp{a.cp}"
    if not par["ok"]:
        return dict(name=name, done=0, summary=summarize([], None), stream_s=float("nan"), failure=par, tokens=None,
                    bound=str(bound), graphs_text="-"), [], False
    rs = par["ranks"]
    s = summarize(merge_ranks([r["calls"] for r in rs]), rs[0]["eager_calls"])  # vs hf-eager on rank 0, interleaved
    graphs = [r["graphs"] for r in rs]
    tokens = compare_tokens(dict(tokens=ref.tokens, gaps=ref.gaps), rs[0]["tokens"])
    same_ranks = all(torch.equal(r["tokens"][i], rs[0]["tokens"][i]) for r in rs[1:] for i in rs[0]["tokens"])
    wall = {i: max(r["wall"][i] for r in rs) for i in rs[0]["wall"]}
    row = dict(name=name, done=len(wall), summary=s, stream_s=sum(wall.values()), failure=None, tokens=tokens,
               bound=str(bound), graphs_text="/".join(map(str, graphs)), rank_graphs=graphs,
               rank_compiles=[r["compiles"] for r in rs], setup_s=max(r["setup_s"] for r in rs), ranks_agree=same_ranks,
               wall=wall)
    notes, ok = [], not tokens["mismatches"] and same_ranks
    if max(graphs) > bound or any(set(r["compiles"].values()) - {1} for r in rs):
        ok = False
        notes.append(f"GRAPHS: {name} compiled {graphs} graphs per rank, bound {bound} (or a shape key twice)")
    if not same_ranks:
        notes.append(f"RANKS DISAGREE: {name}: not every rank generated rank 0's tokens")
    return row, notes, ok


def print_report(a, rows: list[dict], notes: list[str], ok: bool) -> None:
    print()
    print(f"serving stream, CPU ({cpu_model()}, {os.cpu_count()} cores shared with other processes), {a.requests} requests "
          f"(batch 1..{a.max_batch}, prompts {a.min_prompt}..{a.max_prompt}, {a.new_tokens} new tokens), lowering="
          f"{a.lowering}")
    print(report(a, rows, a.requests))
    print(f"(graphs: Dynamo graphs compiled in the stream (mesh: per rank); bound: cpcompile's generate_graph_bound"
          f"({a.max_batch}, {a.prefill_chunk}). compile s: forward calls that compiled a graph, their run included. "
          f"x eager: hf-eager's time on the same non-compiling calls / this one's (> 1 = faster). Mesh: slowest rank per "
          f"call; its ranks have 1 thread each and share {os.cpu_count()} cores; its x eager is against hf-eager run on "
          "rank 0 (1 thread), interleaved with it request by request.)")
    cp_rows = [r for r in rows if "setup_s" in r]
    if cp_rows:
        print("cpcompile parallelize() setup, not in 'compile s': " + ", ".join(f"{r['name']} {r['setup_s']:.1f} s" for r in cp_rows))
    for r in rows:
        f = r["failure"]
        if f is None:
            continue
        if "request" in f:
            print(f"FAILED: {r['name']} at request {f['request'] + 1}/{a.requests} (batch {f['batch']}, width {f['width']}) "
                  f"after {r['summary']['graphs']} graphs: {f['error']}")
        else:
            print(f"FAILED: {r['name']}: {f['error']}")
        if r["name"].startswith("cpcompile"):
            print("  last lines of the traceback:\n    " + "\n    ".join(f["traceback"].strip().splitlines()[-6:]))
    for r in rows:
        t = r["tokens"]
        for kind in ("mismatches", "near_ties"):
            if t and t[kind]:
                print(f"{'TOKEN MISMATCH' if kind == 'mismatches' else 'near-tie'}: {r['name']} vs hf-eager: {t[kind][:5]}"
                      + (" ..." if len(t[kind]) > 5 else ""))
    for note in notes:
        print(note)
    if not ok:
        print("FAILED: cpcompile failed, differs from hf-eager without a near-tie, or exceeds its graph bound (above)")


def write_json(a, ad: dict, stream, bound: int, rows: list[dict], ok: bool, times: dict, partial: bool) -> None:
    import transformers

    out = {
        "device": "CPU",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": ad,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "graph_bound": bound,
        "stream": [dict(batch=ids.shape[0], width=ids.shape[1], prompt_tokens=int(m.sum())) for ids, m in stream],
        "partial": partial,  # True: written after the one-device part, before the mesh run
        "times_s": times,
        "ok": ok,
        "contenders": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows},
    }
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"wrote {a.json}" + (" (one-device part; rewritten after the mesh run)" if partial else ""), flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_serving  # the ranks unpickle serve_rank by reference to this module
    import transformers

    from cpcompile.serving import generate_graph_bound
    from cpcompile.testing import World, WorldError

    transformers.logging.set_verbosity_error()
    ad = {k: v for k, v in vars(a).items() if k != "contender_list"}
    stream = make_stream(ad)
    bound = generate_graph_bound(a.max_batch, a.prefill_chunk)
    widths = sorted(ids.shape[1] for ids, _ in stream)
    print(f"CPU serving benchmark -- device: CPU ({cpu_model()}, {os.cpu_count()} logical cores), torch "
          f"{torch.__version__} (threads={torch.get_num_threads()}), transformers {transformers.__version__}, python "
          f"{platform.python_version()}")
    print(f"model: Llama layers={a.layers} hidden={a.hidden} intermediate={a.intermediate} heads={a.heads} "
          f"kv_heads={a.kv_heads} vocab={a.vocab} fp32 | lowering={a.lowering} | cpcompile max_length={a.max_length} "
          f"prefill_chunk={a.prefill_chunk} max_batch={a.max_batch}")
    print(f"stream: {a.requests} requests, batch 1..{a.max_batch}, prompt widths {widths[0]}..{widths[-1]} (median "
          f"{widths[len(widths) // 2]}), {sum(int(m.sum()) for _, m in stream)} real prompt tokens, {a.new_tokens} "
          f"greedy tokens each | seed {a.seed}")
    print(f"inductor cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default (warm)')}")
    try:
        print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes on this machine compete for the cores)")
    except OSError:
        pass

    t_start = time.perf_counter()
    contenders, setup_s = make_contenders(a, build_model(ad))
    print(f"single device: {', '.join(c.name for c in contenders)}, interleaved per request", flush=True)
    run_single(a, stream, contenders)
    times = dict(single=time.perf_counter() - t_start)
    rows, notes, ok = single_rows(contenders, bound, setup_s)

    if not a.skip_parallel:
        print_report(a, rows, notes, ok)  # the one-device part now: the mesh run may take long
        if a.json:
            write_json(a, ad, stream, bound, rows, ok, times, partial=True)
        n = a.tp * a.cp
        print(f"\nmesh tp{a.tp}xcp{a.cp}: cpcompile on a World of {n} gloo ranks (1 thread each), the same stream; "
              "hf-eager on rank 0 interleaved", flush=True)
        t0 = time.perf_counter()
        world = World(n)
        try:
            par = dict(ok=True, ranks=world.run(bench_serving.serve_rank, ad, timeout_s=a.timeout))
        except WorldError as e:
            tbs = getattr(e, "tracebacks", {}) or {}
            tb = next(iter(tbs.values())) if tbs else str(e)
            par = dict(ok=False, error=_last_error_line(tb) if tbs else str(e).splitlines()[0], traceback=tb[-4000:])
        finally:
            world.close()
        times["mesh"] = time.perf_counter() - t0
        row, more, mesh_ok = mesh_row(a, par, contenders[0], bound)
        rows.append(row)
        notes += more
        ok &= mesh_ok
    times["total"] = time.perf_counter() - t_start

    print_report(a, rows, notes, ok)
    print("(" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + " wall time)")
    if a.json:
        write_json(a, ad, stream, bound, rows, ok, times, partial=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

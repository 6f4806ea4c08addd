"""CPU decode-step benchmark: HF eager vs plain torch.compile vs cpcompile, side by side.

    python benchmarks/bench_decode.py                      # defaults: prompt 512, batch 4
    python benchmarks/bench_decode.py --steps 64 --reps 5 --json /tmp/decode.json
    python benchmarks/bench_decode.py --max-length-sweep 512,8192,32768 --prompt 256   # cpcompile only
    python benchmarks/bench_decode.py --arch mla --batch 1 --prompt 2040 --steps 8 --reps 3   # MLA: absorbed vs HF's expansion

`--arch mla` builds a DeepSeek-V3-shaped MLA model instead (hidden 512, 16 heads, kv_lora_rank 128,
q_lora_rank 256, qk_nope 32 + rope 16, v_head_dim 32, 4 dense layers): HF expands the whole static
cache through kv_b_proj at every step; cpcompile attends the cached latent (absorb_latent.py).
Goal there: cpcompile at least 3x faster than plain torch.compile at context 2048, batch 1.

`--max-length-sweep` times cpcompile alone at several static `max_length`s for the same context
(prompt + decode steps), interleaved step by step: decode should cost the live context, not the
allocated cache (the kernel reads only the filled slots). Goal: largest/smallest <= 1.15.

A small Llama (random seeded weights, fp32, eval) is built from a `LlamaConfig`; three
contenders run the *same* shapes (same batch, prompt, static max length):

  hf-eager        the model with HF's `StaticCache`, no compile
  torch.compile   `torch.compile(model.forward, fullgraph=True, dynamic=False)` (Inductor)
                  with HF's `StaticCache` -- the standard HF static-cache compile recipe
  cpcompile       a deep copy, `cpcompile.parallelize(m, max_length=..., lowering="inductor")`
                  (tp = cp = 1); its wrapper installs cpcompile's own static `KVCache`

Every decode step is a forward of one new token per row, greedy (argmax) next token,
`logits_to_keep=1` (what `generate()` passes), with a 2D attention mask. The 2D mask is
given **padded to the static max length** (zeros past the sequence) to all three
contenders: without it plain torch.compile would see a new mask shape each step and
recompile (cpcompile's wrapper pads it to max_length anyway; HF's masking treats the zero
tail as padding, so semantics are unchanged). The benchmark asserts that no contender
compiles anything during the timed steps.

Noise control: the machines are noisy, so repetitions are interleaved. Each repetition
prefills a fresh cache for every contender (untimed), then for each decode step runs the
three contenders one after another (rotating the order per step); the reported number is
the median over all timed steps of all repetitions.

"compile s" is the wall time of the first prefill + first decode call of each contender
(for the compiled ones this includes Dynamo + Inductor compilation; for eager it is just
two forwards). cpcompile's `parallelize()` itself (one capture trace + a shape probe) is
reported separately as `setup_s` in the JSON and in a footnote line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

# Cold compile by default: Inductor's on-disk caches (FX graph cache, autotune) would otherwise make
# "compile s" of a second run a fraction of the first. --warm-cache keeps the user's cache dir.
if "--warm-cache" not in sys.argv and __name__ == "__main__":
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_decode_inductor_")

import torch
from cpcompile._hf import output_cache, cache_arg

from _machine import cpu_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["llama", "mla"], default="llama", help="the model: a small Llama, or DeepSeek-V3-shaped MLA")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per repetition")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps per repetition, before the timed ones")
    p.add_argument("--reps", type=int, default=3, help="repetitions (fresh prefill each), interleaved across contenders")
    p.add_argument("--max-length", type=int, default=0, help="static cache length; default prompt + warmup + steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma list of contenders to run (hf-eager,torch.compile,cpcompile)")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk compile caches (default: a fresh empty cache dir, so 'compile s' is a cold compile)")
    p.add_argument("--json", metavar="PATH", default="", help="write the numbers here")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model, caches and inputs live")
    p.add_argument("--max-length-sweep", default="", metavar="L1,L2,...",
                   help="cpcompile only: decode ms/token at each static max_length for the same context")
    return p.parse_args(argv)


def build_model(a):
    from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig

    if a.arch == "mla":  # the DeepSeek-shaped MLA config, dense layers (the attention is what differs)
        cfg = DeepseekV3Config(
            vocab_size=a.vocab, hidden_size=512, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
            num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=128, q_lora_rank=256, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=a.layers, n_routed_experts=4, num_experts_per_tok=2,
            n_group=1, topk_group=1, max_position_embeddings=max(4096, a.max_length), tie_word_embeddings=False,
        )
        torch.manual_seed(a.seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(a.device).eval()
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(4096, a.max_length),
        tie_word_embeddings=False,
    )
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.to(a.device).eval()


class Contender:
    """One way of running the model: `new_cache()` and `step(ids, mask, cache) -> (logits, cache)`."""

    name: str

    def __init__(self, name, model, fn, a, static_cache: bool):
        self.name, self.model, self.fn, self.a, self.static_cache = name, model, fn, a, static_cache
        self.compile_s = float("nan")
        self.times: list[float] = []
        self.rep_medians: list[float] = []
        self.tokens: list[torch.Tensor] = []  # per rep: [B, steps] greedy tokens of the timed steps
        self.cache = None

    def new_cache(self):
        if not self.static_cache:
            return None  # cpcompile: the wrapper allocates its KVCache on the first call
        from transformers import StaticCache

        cfg = self.model.config
        cache = StaticCache(config=cfg, max_cache_len=self.a.max_length)
        if getattr(cfg, "kv_lora_rank", None):  # MLA: HF caches the latent [B, 1, L, R] and the rope key [B, 1, L, Dr]
            for layer in cache.layers:
                layer.lazy_initialization(torch.empty(self.a.batch, 1, 0, cfg.kv_lora_rank, device=self.a.device),
                                          torch.empty(self.a.batch, 1, 0, cfg.qk_rope_head_dim, device=self.a.device))
            return cache
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache.early_initialization(self.a.batch, cfg.num_key_value_heads, head_dim, torch.float32, torch.device(self.a.device))
        return cache

    def forward(self, ids, mask, cache):
        out = self.fn(input_ids=ids, attention_mask=mask, **{cache_arg(self.model): cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], output_cache(out)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sweep(a) -> int:
    """cpcompile at several max_length for one context, interleaved; goal: largest/smallest <= 1.15."""
    import transformers

    from cpcompile.parallelize import parallelize

    lengths = [int(x) for x in a.max_length_sweep.split(",")]
    need = a.prompt + a.warmup + a.steps
    if min(lengths) < need:
        sys.exit(f"--max-length-sweep {min(lengths)} < prompt + warmup + steps = {need}")
    a.max_length = max(lengths)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    print(f"decode vs max_length -- {a.device} ({cpu_model()}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"model: Llama layers={a.layers} hidden={a.hidden} heads={a.heads} kv_heads={a.kv_heads} | batch={a.batch} "
          f"context {a.prompt} + {a.warmup + a.steps} decode steps | {a.reps} reps, interleaved")
    base = build_model(a)
    models = {}
    for L in lengths:  # parallelize all first: it resets Dynamo, which would drop graphs compiled before
        models[L] = parallelize(copy.deepcopy(base), max_length=L, lowering="inductor")
    contenders = {L: Contender(f"max_length={L}", m, m.forward, a, static_cache=False) for L, m in models.items()}
    g = torch.Generator().manual_seed(a.seed + 1)
    B, P = a.batch, a.prompt
    times = {L: [] for L in lengths}
    tokens = {L: [] for L in lengths}
    with torch.no_grad():
        for rep in range(a.reps + 1):  # rep 0 compiles, untimed
            prompt = torch.randint(0, a.vocab, (B, P), generator=g).to(a.device)
            mask = torch.ones(B, P + a.warmup + a.steps, dtype=torch.long, device=a.device)
            nxt, caches = {}, {}
            for L, c in contenders.items():
                t0 = time.perf_counter()
                logits, caches[L] = c.forward(prompt, mask[:, :P], None)
                nxt[L] = logits.argmax(-1, keepdim=True)
                if rep == 0:
                    c.compile_s = time.perf_counter() - t0
            for i in range(a.warmup + a.steps):
                order = lengths[(i + rep) % len(lengths):] + lengths[: (i + rep) % len(lengths)]
                for L in order:
                    t0 = time.perf_counter()
                    logits, caches[L] = contenders[L].forward(nxt[L], mask[:, : P + i + 1], caches[L])
                    nxt[L] = logits.argmax(-1, keepdim=True)
                    sync()
                    if rep and i >= a.warmup:
                        times[L].append(time.perf_counter() - t0)
                        tokens[L].append(nxt[L])
    med = {L: statistics.median(times[L]) for L in lengths}
    base_ms = med[lengths[0]]
    print(f"\n{'max_length':>10} | {'decode ms/token (median)':>24} | {'vs max_length=' + str(lengths[0]):>18} | graphs")
    for L in lengths:
        print(f"{L:>10} | {1e3 * med[L]:>24.2f} | {med[L] / base_ms:>17.2f}x | {models[L]._cpcompile.graphs}")
    same = all(torch.equal(torch.cat(tokens[L], 1), torch.cat(tokens[lengths[0]], 1)) for L in lengths)
    ratio = med[lengths[-1]] / base_ms
    goal = ratio <= 1.15
    print(f"tokens identical across max_length: {same}")
    print(f"goal: decode at max_length={lengths[-1]} <= 1.15x max_length={lengths[0]}: {'MET' if goal else 'NOT MET'} ({ratio:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "cpu_model": cpu_model(), "threads": torch.get_num_threads(), "args": vars(a),
                       "decode_ms_median": {str(L): 1e3 * med[L] for L in lengths}, "ratio": ratio, "goal_met": goal,
                       "tokens_identical": same}, f, indent=2)
        print(f"wrote {a.json}")
    return 0 if goal and same else 1


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.max_length_sweep:
        return sweep(a)
    if not a.max_length:
        a.max_length = a.prompt + a.warmup + a.steps
    if a.max_length < a.prompt + a.warmup + a.steps:
        sys.exit(f"--max-length {a.max_length} < prompt + warmup + steps = {a.prompt + a.warmup + a.steps}")

    import transformers

    from cpcompile.parallelize import parallelize

    threads = torch.get_num_threads()
    print(f"CPU decode benchmark -- device: CPU ({cpu_model()}, {os.cpu_count()} logical cores), "
          f"torch {torch.__version__} (threads={threads}), transformers {transformers.__version__}, python {platform.python_version()}")
    model_desc = (f"Llama layers={a.layers} hidden={a.hidden} intermediate={a.intermediate} heads={a.heads} kv_heads={a.kv_heads}"
                  if a.arch == "llama" else
                  f"MLA (DeepSeek-V3 shape) layers={a.layers} hidden=512 heads=16 kv_lora_rank=128 q_lora_rank=256 "
                  f"qk_nope=32 rope=16 v=32 intermediate={a.intermediate}")
    print(f"model: {model_desc} vocab={a.vocab} fp32 | batch={a.batch} prompt={a.prompt} max_length={a.max_length} "
          f"| {a.reps} reps x ({a.warmup} warmup + {a.steps} timed) decode steps, interleaved")
    print(f"inductor cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default (warm)')}")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)  # time the GPU work, not the launch
    if a.device == "cuda":
        print(f"--device cuda: model, caches and inputs on {torch.cuda.get_device_name()} (timings below say CPU)")

    base = build_model(a)
    cp_model = copy.deepcopy(base)

    # cpcompile first: parallelize() calls torch._dynamo.reset() after its capture trace, which
    # would throw away any compiled code made before it.
    t0 = time.perf_counter()
    parallelize(cp_model, max_length=a.max_length, lowering="inductor")
    setup_s = time.perf_counter() - t0

    compiled = torch.compile(base.forward, fullgraph=True, dynamic=False)
    contenders = [
        Contender("hf-eager", base, base.forward, a, static_cache=True),
        Contender("torch.compile", base, compiled, a, static_cache=True),
        Contender("cpcompile", cp_model, cp_model.forward, a, static_cache=False),
    ]
    if a.only:
        keep = set(a.only.split(","))
        contenders = [c for c in contenders if c.name in keep]

    g = torch.Generator().manual_seed(a.seed + 1)
    B, P, L = a.batch, a.prompt, a.max_length

    def fresh_inputs():
        prompt = torch.randint(0, a.vocab, (B, P), generator=g)
        mask = torch.zeros(B, L, dtype=torch.long)
        mask[:, :P] = 1
        return prompt.to(a.device), mask.to(a.device)

    # Compile: first prefill + first decode of each contender, on a throwaway cache.
    with torch.no_grad():
        prompt, mask = fresh_inputs()
        for c in contenders:
            m = mask.clone()
            t0 = time.perf_counter()
            logits, cache = c.forward(prompt, m, c.new_cache())
            nxt = logits.argmax(-1, keepdim=True)
            m[:, P] = 1
            logits, cache = c.forward(nxt, m, cache)
            logits.argmax(-1)
            sync()
            c.compile_s = time.perf_counter() - t0
            print(f"  compiled {c.name:<14} {c.compile_s:7.1f} s", flush=True)

        graphs_before = graphs_compiled()
        ref_gaps = []  # top-1 minus top-2 logit of the first contender, per timed step (near-tie check)
        for rep in range(a.reps):
            prompt, mask = fresh_inputs()
            nxt = {}
            for c in contenders:
                logits, c.cache = c.forward(prompt, mask, c.new_cache())  # prefill, untimed
                nxt[c.name] = logits.argmax(-1, keepdim=True)
            rep_times = {c.name: [] for c in contenders}
            rep_tokens = {c.name: [] for c in contenders}
            for i in range(a.warmup + a.steps):
                mask[:, P + i] = 1
                k = (i + rep) % len(contenders)
                for c in contenders[k:] + contenders[:k]:  # rotate who goes first
                    t0 = time.perf_counter()
                    logits, c.cache = c.forward(nxt[c.name], mask, c.cache)
                    tok = logits.argmax(-1, keepdim=True)
                    sync()
                    dt = time.perf_counter() - t0
                    nxt[c.name] = tok
                    if i >= a.warmup:
                        rep_times[c.name].append(dt)
                        rep_tokens[c.name].append(tok)
                        if c is contenders[0]:
                            top2 = logits.topk(2, dim=-1).values
                            ref_gaps.append((top2[:, 0] - top2[:, 1]).min().item())
            for c in contenders:
                c.times += rep_times[c.name]
                c.rep_medians.append(statistics.median(rep_times[c.name]))
                c.tokens.append(torch.cat(rep_tokens[c.name], dim=1))
            print(f"  rep {rep + 1}/{a.reps}: " + "  ".join(f"{c.name} {1e3 * c.rep_medians[-1]:.2f} ms" for c in contenders), flush=True)
        recompiles = graphs_compiled() - graphs_before

    # Correctness: greedy tokens over the timed steps must agree.
    ref = contenders[0]
    mismatches = {}
    for c in contenders[1:]:
        bad = []
        for rep, (t_ref, t_c) in enumerate(zip(ref.tokens, c.tokens)):
            diff = (t_ref != t_c).nonzero()
            if len(diff):
                row, step = diff[0].tolist()
                bad.append({"rep": rep, "row": row, "step": step, "n_diff": int(len(diff))})
        mismatches[c.name] = bad

    med = {c.name: statistics.median(c.times) for c in contenders}
    tc = med.get("torch.compile")
    eg = med.get("hf-eager")
    print()
    print(f"CPU decode, {B} rows x 1 token per step, prompt {P}, static max_length {L} "
          f"({torch.get_num_threads()} threads, {cpu_model()})")
    hdr = f"{'contender':<15}| {'compile s':>9} | {'decode ms/token (median)':>24} | {'vs torch.compile':>16} | {'vs HF eager':>11}"
    print(hdr)
    print("-" * len(hdr))
    for c in contenders:
        r_tc = f"{med[c.name] / tc:.2f}x" if tc else "n/a"
        r_eg = f"{med[c.name] / eg:.2f}x" if eg else "n/a"
        print(f"{c.name:<15}| {c.compile_s:>9.1f} | {1e3 * med[c.name]:>24.2f} | {r_tc:>16} | {r_eg:>11}")
    print(f"(ms/token = wall time of one decode step for all {B} rows; per-row cost is that / {B}. "
          f"cpcompile parallelize() setup, not in 'compile s': {setup_s:.1f} s)")
    print(f"recompiles during timed steps: {recompiles}" + ("" if recompiles == 0 else "  <-- shapes are not static!"))
    min_gap = min(ref_gaps) if ref_gaps else float("nan")
    for name, bad in mismatches.items():
        if bad:
            print(f"TOKEN MISMATCH: {name} vs {ref.name}: {bad} (smallest top-1/top-2 logit gap of {ref.name}: {min_gap:.2e})")
        else:
            print(f"tokens: {name} matches {ref.name} on all {a.reps * a.steps} timed steps x {B} rows")
    goal = None
    if tc and "cpcompile" in med and a.arch == "mla":
        speedup = tc / med["cpcompile"]
        goal = speedup >= 3.0
        print(f"goal: cpcompile (absorbed MLA) >= 3x faster than plain torch.compile: {'MET' if goal else 'NOT MET'} ({speedup:.2f}x)")
    elif tc and "cpcompile" in med:
        ratio = med["cpcompile"] / tc
        goal = ratio <= 1.10
        print(f"goal: cpcompile decode <= 1.10x plain torch.compile: {'MET' if goal else 'NOT MET'} ({ratio:.2f})")

    if a.json:
        out = {
            "device": "CPU" if a.device == "cpu" else torch.cuda.get_device_name(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "args": vars(a),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "cpcompile_setup_s": setup_s,
            "recompiles_during_timed_steps": recompiles,
            "min_ref_logit_gap": min_gap,
            "token_mismatches": mismatches,
            "goal_met": goal,
            "contenders": {
                c.name: {
                    "compile_s": c.compile_s,
                    "decode_ms_median": 1e3 * med[c.name],
                    "decode_ms_rep_medians": [1e3 * x for x in c.rep_medians],
                    "decode_ms_all": [1e3 * x for x in c.times],
                    "ratio_vs_torch_compile": med[c.name] / tc if tc else None,
                    "ratio_vs_hf_eager": med[c.name] / eg if eg else None,
                }
                for c in contenders
            },
        }
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

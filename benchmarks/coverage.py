"""Coverage over all of transformers: which decoder-only causal LMs `parallelize` runs exactly.

    python benchmarks/coverage.py                                   # every architecture at 2x2, then at 1x1
    python benchmarks/coverage.py --arch llama,gpt2 --meshes 1x1,2x1,1x2,2x2 --json /tmp/cov.json
    python benchmarks/coverage.py --list                            # the selection and the skips, nothing run
    python benchmarks/coverage.py --budget-s 5400                   # stop starting new cases after 90 min (default 3 h)
    python benchmarks/coverage.py --markdown out.json               # docs/coverage.md's tables from a run's JSON

Architectures: every key of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, minus the ones the
decoder-only rule skips (`skip_reason`, printed with the reason, never dropped silently):
  * an alias: the same config class and model class as an earlier key (gpt-sw3 = gpt2);
  * encoder-decoder: the default config has `is_encoder_decoder=True` (the CausalLM class is
    the decoder half of a seq2seq model: bart, marian, whisper, musicgen, ...);
  * multimodal / composite: the config has a sub-config for another modality or model part
    (a name containing vision, audio, vq, image, speech, patcher, encoder or decoder); the
    text-only variant, where transformers ships one (gemma3_text, qwen3_5_text), is swept.
Encoder families whose CausalLM class is causal only with `is_decoder=True` (bert, roberta, ...)
are swept with that flag set: they are causal LMs transformers ships, run as such.

Tiny config (`tiny_config`): the architecture's own config class, built with its defaults and a
generic shrink (`SHRINK`): each key is set when the class has that field (directly or through
its `attribute_map`): 2 layers, hidden 64, 4 query heads, 2 KV heads, head_dim 16, FFN 128,
vocab 256, 256 positions, 4 experts (2 per token, dense first layer), MLA ranks
(kv 16, q 24, rope 8, nope 16, v 16), a set sliding window shrunk to 8 (so prompt + decode
cross it). A per-layer list (layer_types and the like) keeps one layer of each kind. An
override table (`OVERRIDES`) holds the few configs whose shrunk defaults do not build.
Weights: seeded (`torch.manual_seed(seed)`), fp32, every weight matrix redrawn N(0, 0.2) as in
`cpcompile.tiny` (HF's 0.02 init gives near-flat logits, where greedy ties are meaningless).

Per architecture and mesh (TPxCP: `2x1` is tp=2, cp=1), `cpcompile.testing.assert_equivalent`
with two prompts (one left-padded), 4 steps (prefill + 3 decodes), lowering `aot_eager`
(Dynamo + AOTAutograd without Inductor's codegen: the graph cpcompile rewrites is the same,
compiles several times faster on CPU), fp32 tolerances of `cpcompile.testing.FP32_TOLERANCE`.
Ranks run in persistent gloo worlds (`World(n)`, one per rank count, started once; 1x1 runs in
a one-rank world too, so a crash or hang never takes this process down); a world that times out
or dies is torn down and restarted for the next case.

Outcome of each (architecture, mesh):
  exact    assert_equivalent passed (logits within tolerance, tokens equal or near-tie);
  refused  a cpcompile error naming a missing capability (MeshError, AttentionError,
           TokenSplitError, or a ValueError whose message starts with "cpcompile" or a pass name);
  caught   cpcompile's own self-verification at parallelize (`cpcompile.verify.VerificationError`)
           found the rewritten model wrong and said so: a bug, but not silent;
  failed   any other exception (Dynamo errors, crashes, timeouts);
  wrong    assert_equivalent's AssertionError: the parallel model runs and differs (the worst);
  unbuilt  the tiny config or the HF model itself does not build or run (or gives non-finite
           logits) on one device: nothing of cpcompile's was tried.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import json
import os
import platform
import re
import signal
import sys
import time
import traceback

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (as tests/conftest.py)

import importlib.util

if importlib.util.find_spec("cpcompile") is None:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import transformers

PROMPTS = [[5, 6, 7, 8, 9], [10, 11]]  # row 1 is left-padded
MAX_NEW_TOKENS = 4
LOWERING = "aot_eager"
SEED = 0
INIT_STD = 0.2
DEFAULT_MESHES = "2x2,1x1"  # mesh-major: 2x2 (tp and cp together) for every architecture first
ALL_MESHES = "1x1,2x1,1x2,2x2"
CASE_TIMEOUT_S = 600.0
BUDGET_S = 10800.0  # the full sweep's budget: 3 h (docs/coverage.md: ~165 architectures x 1x1 + 2x2 on 2 cores)
MAX_PARAMS = 20_000_000  # a tiny config has well under 1M  # one (architecture, mesh): reference + every rank's compile and 4 steps

# ----------------------------------------------------------------------------- selection

_MODALITY = re.compile(r"vision|audio|vq|image|speech|patcher|encoder|decoder")


@dataclasses.dataclass
class Arch:
    name: str  # the model_type key in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    config_class: str
    model_class: str
    skip: str | None  # why the decoder-only rule skips it, None if swept


def architectures() -> list[Arch]:
    """Every key of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, each with its skip reason (or None)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    seen: dict[tuple[str, str], str] = {}
    out = []
    # the key equal to the config's own model_type first, so an alias (gpt-sw3) points at it (gpt2)
    def canonical_first(name):
        cls = CONFIG_MAPPING[name] if name in CONFIG_MAPPING else None
        return (getattr(cls, "model_type", name) != name, name)

    for name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, key=canonical_first):
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name]
        try:
            cls = CONFIG_MAPPING[name]
        except Exception as e:  # noqa: BLE001 (a missing optional dependency: reported, not dropped)
            out.append(Arch(name, "?", model_class, f"config class not importable: {type(e).__name__}: {_first_line(e)}"))
            continue
        key = (cls.__name__, model_class)
        skip = None
        if key in seen:
            skip = f"alias of {seen[key]} (same {cls.__name__} and {model_class})"
        else:
            seen[key] = name
            defaults = _defaults(cls)
            subs = list(getattr(cls, "sub_configs", {}) or {})
            if getattr(defaults, "is_encoder_decoder", False):
                skip = "encoder-decoder: the CausalLM class is the decoder half of a seq2seq model"
            elif any(_MODALITY.search(s) for s in subs):
                skip = f"multimodal/composite: sub-configs {subs}"
        out.append(Arch(name, cls.__name__, model_class, skip))
    return sorted(out, key=lambda a: a.name)


def _defaults(cls):
    try:
        return cls()
    except Exception:  # noqa: BLE001 (a config whose defaults do not validate: tiny_config reports it)
        return None


# ----------------------------------------------------------------------------- tiny configs

# Generic shrink: key -> value, set where the config class has the field (or maps the key to one).
SHRINK = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "ffn_hidden_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "qk_head_dim": 32,
    "v_head_dim": 16,
    "rotary_dim": 8,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Only shrunk where the default sets them (None means "off" or "derived").
SHRINK_IF_SET = {
    "sliding_window": 8,
    "q_lora_rank": 24,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
}

# Configs whose shrunk defaults do not build, and what makes them build.
OVERRIDES: dict[str, dict] = {
    "dots1": dict(n_shared_experts=1),  # default None, but the model multiplies by it
}


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def tiny_config(name: str):
    """The architecture's own config class, defaults shrunk (module docstring); raises if it does not build."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[name]
    kwargs = _shrink(cls)
    kwargs.update(OVERRIDES.get(name, {}))
    return cls(**kwargs)


def _shrink(cls) -> dict:
    """Keyword arguments that shrink `cls`'s defaults (a text sub-config is shrunk the same way)."""
    fields = _field_names(cls)
    amap = dict(getattr(cls, "attribute_map", {}) or {})
    defaults = _defaults(cls)

    def field(key):
        f = amap.get(key, key)
        return f if f in fields or (defaults is not None and f in vars(defaults)) else None

    kwargs = {}
    for key, value in SHRINK.items():
        f = field(key)
        if f is not None:
            kwargs[f] = value
    for key, value in SHRINK_IF_SET.items():
        f = field(key)
        if f is not None and defaults is not None and getattr(defaults, f, None) not in (None, 0, False):
            kwargs[f] = value
    if defaults is not None:
        # Per-layer lists (layer_types, ...): keep one layer of each kind, in order of first appearance.
        n_default = getattr(defaults, "num_hidden_layers", None)
        for f in sorted(fields | set(vars(defaults))):
            v = getattr(defaults, f, None)
            if isinstance(v, (list, tuple)) and n_default and len(v) == n_default and len(v) > 2 and f != "architectures":
                kinds = list(dict.fromkeys(map(repr, v)))
                firsts = [next(x for x in v if repr(x) == k) for k in kinds]
                if len(firsts) < 2:
                    firsts = list(v[:2])
                kwargs[f] = type(v)(firsts)
                nl = field("num_hidden_layers")
                if nl:
                    kwargs[nl] = max(kwargs.get(nl, 2), len(firsts))
        if "is_decoder" in fields and getattr(defaults, "is_decoder", None) is False and "add_cross_attention" in fields:
            kwargs["is_decoder"] = True  # bert-style encoders: causal only as decoders
    if "kv_lora_rank" in kwargs:  # MLA: the latent is expanded to every query head (no GQA)
        for key in ("num_key_value_heads", "num_kv_heads"):
            if field(key):
                kwargs[field(key)] = SHRINK["num_attention_heads"]
    text = (getattr(cls, "sub_configs", None) or {}).get("text_config")
    if text is not None and "text_config" in fields:
        kwargs["text_config"] = text(**_shrink(text)).to_dict()
    return kwargs


def build_model(name: str, seed: int = SEED) -> torch.nn.Module:
    """The factory every rank calls: tiny config, seeded weights, fp32, eval."""
    cfg = tiny_config(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        for p in model.parameters():
            if p.dim() > 1 and p.is_floating_point():
                torch.nn.init.normal_(p, std=INIT_STD)
    return model.eval()


def check_reference(name: str) -> str | None:
    """Build the model and run assert_equivalent's reference on it (HF eager, one device: the prefill
    and the greedy decode steps); the reason it is unbuilt, or None."""
    from cpcompile.testing.equivalence import left_padded, run_reference

    try:
        with torch.device("meta"):  # a default the shrink missed would allocate gigabytes
            n = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(tiny_config(name)).parameters())
        if n > MAX_PARAMS:
            return f"the shrunk config still has {n / 1e6:.0f}M parameters (> {MAX_PARAMS / 1e6:.0f}M): a size field the shrink does not know"
        ids, mask = left_padded(PROMPTS, pad_id=0)
        logits, _, _ = run_reference(functools.partial(build_model, name), None, ids, mask, MAX_NEW_TOKENS)
    except Exception as e:  # noqa: BLE001 (any failure to build is this category's reason)
        return f"{type(e).__name__}: {_first_line(e)}"
    if not torch.isfinite(logits).all():
        return "the reference's logits are not finite"
    return None


# ----------------------------------------------------------------------------- outcomes

_VerificationError = None


def _verification_error():
    global _VerificationError
    if _VerificationError is None:
        try:
            import cpcompile.verify as verify

            _VerificationError = getattr(verify, "VerificationError", ())
        except ImportError:
            _VerificationError = ()
    return _VerificationError


_REFUSALS = ("MeshError", "AttentionError", "TokenSplitError", "CaptureError", "ProbeError")
_PASS_PREFIXES = ("cpcompile", "parallelize", "find_attention", "find_projections", "plan", "shard_weights",
                  "rewrite_attention", "shard_linears", "gather_replicas", "split_tokens", "normalize_linears",
                  "probe", "layout", "KVCache", "attention #")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*?(Error|Exception|Unsupported|Exit|Interrupt|Timeout)\w*)(: (.*))?$")


def _first_line(e) -> str:
    return _head(str(e))


def _head(text: str) -> str:
    """A message's first line; with the next non-empty line when the first ends in ':' (a header)."""
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    if not lines:
        return ""
    head = lines[0]
    if head.endswith(":") and len(lines) > 1:
        head = f"{head} {lines[1]}"
    return head[:300]


def _parse_traceback(tb: str) -> tuple[str, str]:
    """(qualified exception type, first line of its message) of the last exception in a traceback text."""
    found = []
    for chunk in tb.split("Traceback (most recent call last):")[1:]:
        lines = chunk.splitlines()
        for i, line in enumerate(lines):
            m = _EXC_LINE.match(line)
            if m and not line.startswith(" "):
                found.append((m.group(1), _head("\n".join([m.group(4) or ""] + lines[i + 1:i + 3]))))
                break
    if found:
        etype, msg = found[-1]
        if len(found) > 1 and "_dynamo" in etype:  # Dynamo wraps the error that matters: name it too
            msg = f"{msg} (cause: {found[-2][0]}: {found[-2][1]})"[:400]
        return etype, msg
    lines = [l for l in tb.strip().splitlines() if l.strip()]
    return "unknown", (lines[-1].strip()[:300] if lines else "")


def classify_error(etype: str, message: str) -> str:
    short = etype.rsplit(".", 1)[-1]
    if short == "VerificationError":
        return "caught"
    if short in _REFUSALS:
        return "refused"
    if short in ("ValueError", "NotImplementedError", "TypeError") and message.startswith(_PASS_PREFIXES):
        return "refused"
    return "failed"


def classify(exc: BaseException) -> tuple[str, str]:
    """-> (outcome, reason) for an exception out of assert_equivalent."""
    from cpcompile.testing import WorldError

    if isinstance(exc, AssertionError) and str(exc).startswith("assert_equivalent:"):
        lines = str(exc).splitlines()
        return "wrong", " ".join(l.strip() for l in lines[:2])[:400]
    if isinstance(exc, WorldError):
        if not exc.tracebacks:  # a hang or a dead rank
            return "failed", f"WorldError: {_first_line(exc)}"
        rank, tb = min(exc.tracebacks.items())
        etype, msg = _parse_traceback(tb)
        return classify_error(etype, msg), f"{etype}: {msg}"
    etype = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
    ver = _verification_error()
    if ver and isinstance(exc, ver):
        return "caught", f"{etype}: {_first_line(exc)}"
    return classify_error(etype, _first_line(exc)), f"{etype}: {_first_line(exc)}"


# ----------------------------------------------------------------------------- running


class Worlds:
    """One persistent World per rank count, restarted after a timeout or a crash."""

    def __init__(self):
        self._worlds = {}

    def get(self, n: int):
        from cpcompile.testing import World

        if n not in self._worlds:
            self._worlds[n] = World(n)
        return self._worlds[n]

    def restart(self, n: int) -> None:
        w = self._worlds.pop(n, None)
        if w is not None:
            w.close(graceful=False)

    def close(self) -> None:
        for w in self._worlds.values():
            w.close()
        self._worlds.clear()


class _CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise _CaseTimeout("case timed out")


def parse_mesh(s: str) -> tuple[int, int]:
    tp, cp = s.lower().split("x")
    return int(tp), int(cp)


def run_case(name: str, mesh: str, worlds: Worlds | None, timeout_s: float = CASE_TIMEOUT_S, world=None) -> dict:
    """One (architecture, mesh) through assert_equivalent; the outcome, its reason, the time taken.

    `world`: a World of tp*cp ranks to use (tests pass their session's), else `worlds` provides
    one; with neither, 1x1 runs in this process."""
    from cpcompile.testing import assert_equivalent
    from cpcompile.testing import equivalence

    tp, cp = parse_mesh(mesh)
    world_timeout = equivalence.WORLD_TIMEOUT_S
    equivalence.WORLD_TIMEOUT_S = timeout_s  # a hung rank is torn down after this (read at call time)
    w = world if world is not None or worlds is None else worlds.get(tp * cp)
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm) if hasattr(signal, "SIGALRM") else None
    if old is not None:
        signal.alarm(int(timeout_s) + 60)  # the reference runs here; a hang in it is caught too
    try:
        r = assert_equivalent(functools.partial(build_model, name), tp=tp, cp=cp, prompts=PROMPTS,
                              max_new_tokens=MAX_NEW_TOKENS, lowering=LOWERING, world=w)
        outcome = dict(outcome="exact", reason="", max_abs_error=r.max_abs_error, near_ties=len(r.near_ties),
                       ranks_bitwise_equal=r.ranks_bitwise_equal)
    except _CaseTimeout:
        outcome = dict(outcome="failed", reason=f"timeout: no answer within {timeout_s + 60:.0f} s")
        if world is None and worlds is not None:
            worlds.restart(tp * cp)
    except Exception as e:  # noqa: BLE001 (every exception is an outcome to record)
        kind, reason = classify(e)
        outcome = dict(outcome=kind, reason=reason)
        if kind == "wrong":
            outcome["detail"] = str(e).split("Reproduce with:")[0].strip()
        elif kind in ("failed", "caught") and not reason.startswith("WorldError"):
            tbs = getattr(e, "tracebacks", None)
            outcome["traceback"] = (min(tbs.items())[1] if tbs else "".join(traceback.format_exception(e)))[-6000:]
    finally:
        equivalence.WORLD_TIMEOUT_S = world_timeout
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    outcome.update(arch=name, mesh=mesh, seconds=round(time.perf_counter() - t0, 1))
    return outcome


# ----------------------------------------------------------------------------- report

SHORT = dict(exact="exact", refused="REFUSED", caught="CAUGHT", failed="FAILED", wrong="WRONG!", unbuilt="unbuilt",
             skipped="-", not_run="(not run)")
OUTCOMES = ("exact", "refused", "caught", "failed", "wrong", "unbuilt")


def _normalize(reason: str) -> str:
    """A reason with numbers and layer/node names blurred, so the same cause groups together."""
    r = re.sub(r"attention #\d+", "attention #N", reason)
    r = re.sub(r"\b\d+(\.\d+)?\b", "N", r)
    return r[:200]


def summarize(results: list[dict], meshes: list[str], swept: list[str]) -> dict:
    """Totals per mesh, the share exact (per mesh, and at every mesh among the architectures run at
    every mesh), and the reasons for the rest, most common first (over every case run)."""
    by_arch = collections.defaultdict(dict)
    for r in results:
        by_arch[r["arch"]][r["mesh"]] = r
    totals = {m: collections.Counter(by_arch[a][m]["outcome"] for a in swept if m in by_arch[a]) for m in meshes}
    complete = [a for a in swept if all(m in by_arch[a] for m in meshes)]
    exact_all = [a for a in complete if all(by_arch[a][m]["outcome"] == "exact" for m in meshes)]
    reasons, example = collections.Counter(), {}
    for r in results:
        if r["outcome"] != "exact":
            key = (r["outcome"], _normalize(r["reason"]))
            reasons[key] += 1
            example.setdefault(key, set()).add(r["arch"])
    top = [dict(outcome=k[0], reason=k[1], cases=n, architectures=sorted(example[k])) for k, n in reasons.most_common()]
    share = {m: (totals[m]["exact"] / sum(totals[m].values())) if sum(totals[m].values()) else 0.0 for m in meshes}
    return dict(swept=len(swept), complete=len(complete), exact_all_meshes=len(exact_all),
                share_exact=(len(exact_all) / len(complete)) if complete else 0.0, share_exact_per_mesh=share,
                exact_architectures=exact_all, totals={m: dict(totals[m]) for m in meshes}, reasons=top)


def print_table(results: list[dict], meshes: list[str], archs: list[Arch], summary: dict, out=sys.stdout) -> None:
    by = {(r["arch"], r["mesh"]): r for r in results}
    w = max([len(a.name) for a in archs] + [12])
    print(f"{'architecture':<{w}}  " + "  ".join(f"{m:>9}" for m in meshes) + "  first non-exact reason", file=out)
    for a in archs:
        if a.skip is not None:
            continue
        cells, first = [], ""
        for m in meshes:
            r = by.get((a.name, m))
            o = r["outcome"] if r else "not_run"
            cells.append(f"{SHORT[o]:>9}")
            if r and o != "exact" and not first:
                first = f"[{m}] {r['reason']}"
        print(f"{a.name:<{w}}  " + "  ".join(cells) + f"  {first[:140]}", file=out)
    print(file=out)
    print("skipped by the decoder-only rule:", file=out)
    for a in archs:
        if a.skip is not None:
            print(f"  {a.name:<{w}} {a.skip}", file=out)
    print(file=out)
    print(f"{'totals':<{w}}  " + "  ".join(f"{m:>9}" for m in meshes), file=out)
    for o in OUTCOMES:
        print(f"{o:<{w}}  " + "  ".join(f"{summary['totals'][m].get(o, 0):>9}" for m in meshes), file=out)
    print(file=out)
    print(f"exact at every mesh: {summary['exact_all_meshes']} of {summary['complete']} architectures run at every mesh "
          f"({100 * summary['share_exact']:.0f}%); {summary['swept']} swept", file=out)
    print("exact per mesh: " + ", ".join(f"{m} {100 * v:.0f}% of {sum(summary['totals'][m].values())} run"
                                         for m, v in summary["share_exact_per_mesh"].items()), file=out)
    print("top reasons for the rest (outcome, cases, reason, architectures):", file=out)
    for r in summary["reasons"][:15]:
        names = ", ".join(r["architectures"][:8]) + (" ..." if len(r["architectures"]) > 8 else "")
        print(f"  {r['outcome']:<8} {r['cases']:>3}  {r['reason'][:150]}  [{names}]", file=out)


_USER_FRAME = re.compile(r'File "[^"]*/(transformers/[^"]+|cpcompile/[^"]+)", line (\d+), in (\w+)')


def where(result: dict) -> str:
    """The innermost transformers/cpcompile frame of a failure's traceback: 'models/bloom/modeling_bloom.py:271 forward'."""
    frames = _USER_FRAME.findall(result.get("traceback", ""))
    if not frames:
        return ""
    path, line, fn = frames[-1]
    return f"{path.removeprefix('transformers/')}:{line} {fn}"


def markdown(data: dict) -> str:
    """docs/coverage.md's table, totals and reasons, from a --json file."""
    meshes, results = data["meshes"], data["results"]
    by = {(r["arch"], r["mesh"]): r for r in results}
    archs = data.get("swept") or sorted({r["arch"] for r in results})
    s = summarize(results, meshes, archs)
    out = ["| architecture | " + " | ".join(meshes) + " | first non-exact reason |", "|---|" + "---|" * len(meshes) + "---|"]
    for a in archs:
        cells, first = [], ""
        for m in meshes:
            r = by.get((a, m))
            o = r["outcome"] if r else "not_run"
            cells.append("**WRONG**" if o == "wrong" else SHORT[o])
            if r and o != "exact" and not first:
                w = where(r) if o in ("failed", "caught") else ""
                first = f"[{m}] {r['reason'][:160]}" + (f" (at `{w}`)" if w else "")
        out.append(f"| {a} | " + " | ".join(cells) + f" | {first.replace('|', '/')} |")
    out += ["", "| outcome | " + " | ".join(meshes) + " |", "|---|" + "---|" * len(meshes)]
    for o in OUTCOMES:
        out.append(f"| {o} | " + " | ".join(str(s["totals"].get(m, {}).get(o, 0)) for m in meshes) + " |")
    out.append("| not run | " + " | ".join(
        str(s["swept"] - sum(s["totals"].get(m, {}).values())) for m in meshes) + " |")
    out += ["", "| outcome | cases | reason (numbers blurred) | architectures |", "|---|---|---|---|"]
    for r in s["reasons"][:25]:
        out.append(f"| {r['outcome']} | {r['cases']} | {r['reason'][:160].replace('|', '/')} | {', '.join(r['architectures'])} |")
    commits = data["versions"].get("commits")
    if commits:
        out += ["", "Cases by the cpcompile commit they ran at (merged runs): "
                + ", ".join(f"`{c}` {n}" for c, n in sorted(commits.items(), key=lambda kv: -kv[1])) + "."]
    out += ["", "Skipped by the decoder-only rule:", ""]
    out += [f"- {a}: {why}" for a, why in sorted(data["skipped"].items())]
    return "\n".join(out) + "\n"


def merge(paths: list[str]) -> dict:
    """One --json document from several runs (a full sweep, then reruns of some architectures):
    a later file's result for an (architecture, mesh) replaces an earlier one's. Each result
    keeps the commit it ran at (`commit`), and `versions.commits` counts the cases per commit."""
    merged, by = None, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        commit = data["versions"].get("cpcompile_commit")
        for r in data["results"]:
            by[(r["arch"], r["mesh"])] = dict(r, commit=r.get("commit", commit))
        if merged is None:
            merged = dict(data, meshes=list(data["meshes"]), seconds=0.0)
        merged["meshes"] += [m for m in data["meshes"] if m not in merged["meshes"]]
        merged["swept"] = sorted(set(merged.get("swept") or []) | set(data.get("swept") or []))
        merged["seconds"] = round(merged["seconds"] + data["seconds"], 1)
    order = ALL_MESHES.split(",")
    merged["meshes"] = sorted(merged["meshes"], key=lambda m: order.index(m) if m in order else len(order))
    results = list(by.values())
    versions = dict(merged["versions"], cpcompile_commit=None, merged_from=paths,
                    commits=dict(collections.Counter(r["commit"] for r in results)))
    return dict(merged, versions=versions, results=results,
                summary=summarize(results, merged["meshes"], merged["swept"]))


def _versions() -> dict:
    import cpcompile

    commit = None
    root = os.path.dirname(os.path.dirname(os.path.abspath(cpcompile.__file__)))
    try:
        import subprocess

        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 (not a checkout)
        pass
    if commit is None and os.path.exists(os.path.join(root, "COMMIT")):
        commit = open(os.path.join(root, "COMMIT")).read().strip()
    return dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                cpcompile_path=os.path.dirname(cpcompile.__file__), cpcompile_commit=commit)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="", help="comma-separated model_type keys (default: every swept architecture)")
    p.add_argument("--meshes", default=DEFAULT_MESHES, help=f"TPxCP list (default {DEFAULT_MESHES}; all: {ALL_MESHES})")
    p.add_argument("--json", default="", help="write every result here")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"stop starting new cases after this many seconds (default {BUDGET_S:.0f}; 0: none)")
    p.add_argument("--case-timeout-s", type=float, default=CASE_TIMEOUT_S)
    p.add_argument("--list", action="store_true", help="print the selection and the skips; run nothing")
    p.add_argument("--markdown", default="", help="print docs/coverage.md's tables from this --json file; run nothing")
    p.add_argument("--merge", default="", metavar="A.json,B.json,...",
                   help="write one --json from several runs, later results replacing earlier ones; run nothing")
    args = p.parse_args(argv)
    if args.merge:
        if not args.json:
            p.error("--merge needs --json OUT")
        data = merge([x for x in args.merge.split(",") if x])
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        print(f"{args.json}: {len(data['results'])} cases from {len(data['versions']['merged_from'])} runs; "
              f"totals {data['summary']['totals']}")
        return 0
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)), end="")
        return 0

    torch._dynamo.config.cache_size_limit = 64
    meshes = [m.strip() for m in args.meshes.split(",") if m.strip()]
    archs = architectures()
    if args.arch:
        wanted = [a.strip() for a in args.arch.split(",") if a.strip()]
        known = {a.name: a for a in archs}
        missing = [a for a in wanted if a not in known]
        if missing:
            p.error(f"unknown architecture(s) {missing}; expected keys of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
        archs = [known[a] for a in wanted]
    if args.list:
        for a in archs:
            print(f"{a.name:<28} {a.model_class:<44} {a.skip or 'swept'}")
        return 0

    worlds, results, t_start = Worlds(), [], time.perf_counter()
    versions = _versions()
    print(f"# coverage: {len([a for a in archs if a.skip is None])} architectures x meshes {meshes}; lowering {LOWERING}; "
          f"torch {versions['torch']}, transformers {versions['transformers']}, cpcompile {versions['cpcompile_commit']}",
          flush=True)

    def dump():
        if args.json:
            summary = summarize(results, meshes, [a.name for a in archs if a.skip is None])
            with open(args.json, "w") as f:
                json.dump(dict(versions=versions, meshes=meshes, lowering=LOWERING, prompts=PROMPTS,
                               max_new_tokens=MAX_NEW_TOKENS, seconds=round(time.perf_counter() - t_start, 1),
                               budget_s=args.budget_s, skipped={a.name: a.skip for a in archs if a.skip},
                               swept=[a.name for a in archs if a.skip is None],
                               summary=summary, results=results), f, indent=1)

    # Mesh-major: every architecture at the first mesh, then at the next, so that a budget that
    # runs out leaves whole meshes done rather than whole architectures.
    unbuilt: dict[str, str | None] = {}
    try:
        for m in meshes:
            for a in archs:
                if a.skip is not None:
                    continue
                if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                    print(f"{a.name} {m}: budget of {args.budget_s:.0f} s spent; not run", flush=True)
                    continue
                t0 = time.perf_counter()
                if a.name not in unbuilt:
                    unbuilt[a.name] = check_reference(a.name)
                if unbuilt[a.name] is not None:
                    r = dict(arch=a.name, mesh=m, outcome="unbuilt", reason=unbuilt[a.name],
                             seconds=round(time.perf_counter() - t0, 1))
                else:
                    r = run_case(a.name, m, worlds, timeout_s=args.case_timeout_s)
                results.append(r)
                print(f"{a.name} {m}: {r['outcome']} {r['seconds']:.0f}s {r['reason'][:160]}", flush=True)
                dump()
    finally:
        worlds.close()
    summary = summarize(results, meshes, [a.name for a in archs if a.skip is None])
    print()
    print_table(results, meshes, archs, summary)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m cpcompile generate`: start dp·tp·cp ranks on this machine and generate with HF's API.

The ranks are started by torch's own launcher machinery (`elastic_launch`, the engine behind
torchrun: c10d rendezvous on 127.0.0.1, one node, `nproc_per_node = dp·tp·cp`). Every rank loads
the model, calls `cpcompile.parallelize(model, tp=, cp=, ...)` and `model.generate(...)`; rank 0
streams the new tokens as they come and, at the end, prints per-rank weight and KV bytes against
one device, the collectives of one decode step and the time per token. Rank 0 also checks that
every rank produced the same tokens.

Failures: a rank that raises writes its error to a file and exits 1 (the launcher then stops the
other ranks, which would otherwise wait in a collective); the parent prints each distinct error
once, naming the ranks that raised it (`--traceback` adds the lowest failing rank's traceback).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass

import torch

TINY_SEED = 0


@dataclass(frozen=True)
class GenerateSpec:
    """What every rank is told (picklable: it crosses into the spawned ranks)."""

    model: str
    """A tiny architecture name (cpcompile.tiny) or a local Hugging Face model directory."""
    tp: int = 1
    cp: int = 1
    dp: int = 1
    combine: str = "all_to_all"
    kv_interleave: int = 1
    lowering: str = "inductor"
    prompt: str | None = None
    """Text prompt; for a tiny model (no tokenizer) its UTF-8 bytes are the token ids."""
    prompt_len: int | None = None
    """A prompt of this many seeded random token ids (instead of `prompt`)."""
    max_new_tokens: int = 64
    batch: int = 1
    dtype: str = "float32"
    timeout_s: int = 600
    """Process-group timeout: a rank stuck in a collective fails after this long."""
    error_dir: str = ""
    show_traceback: bool = False

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.cp


def launch(spec: GenerateSpec) -> int:
    """Run `spec` on `spec.world` local ranks; returns the process exit code (0: all ranks agreed)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # we report failures ourselves, once
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="cpcompile-launch-") as error_dir:
        spec = dataclasses.replace(spec, error_dir=error_dir)
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=spec.world,
            run_id=f"cpcompile-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{_free_port()}",
            local_addr="127.0.0.1",
            max_restarts=0,
            monitor_interval=0.1,
        )
        try:
            codes = elastic_launch(config, _rank_main)(spec)
        except ChildFailedError as e:
            _report_failures(spec, {r: f.exitcode for r, f in e.failures.items()})
            return 1
        return 0 if all(c == 0 for c in codes.values()) else 1


def _rank_main(spec: GenerateSpec) -> int:
    """Entry point of every rank (started by the elastic agent with RANK, WORLD_SIZE, ... set)."""
    rank = int(os.environ["RANK"])
    try:
        return _generate_on_rank(spec, rank)
    except BaseException as e:  # noqa: BLE001  (reported by the parent, once)
        while getattr(e, "inner_exception", None) is not None:  # Dynamo's BackendCompilerFailed wraps our error
            e = e.inner_exception
        summary = f"{type(e).__name__}: {e}"
        with open(os.path.join(spec.error_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"summary": summary, "traceback": traceback.format_exc()}, f)
        sys.exit(1)  # not an exception: no per-rank traceback on stderr; the agent stops the others


def _generate_on_rank(spec: GenerateSpec, rank: int) -> int:
    import torch.distributed as dist

    import cpcompile
    from cpcompile.cache import KVCache

    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))  # the ranks share this machine's cores
    if rank != 0:
        import warnings

        import transformers

        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=spec.timeout_s)
    )
    try:
        model, tokenizer, label = load(spec.model, getattr(torch, spec.dtype), device)
        ids, mask = _prompt(spec, model, tokenizer, device)
        max_length = ids.shape[1] + spec.max_new_tokens
        one_device = {
            "weight": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv": KVCache(_num_layers(model), max_length).allocate(model, spec.batch).kv_bytes(),
        }
        if rank == 0:
            print(
                f"cpcompile generate: {label}; dp={spec.dp} tp={spec.tp} cp={spec.cp} ({spec.world} rank{'s' if spec.world > 1 else ''}), "
                f"combine={spec.combine}, kv_interleave={spec.kv_interleave}, lowering={spec.lowering}"
            )
            print(f"prompt ({ids.shape[1]} tokens): {_show(ids[0].tolist(), tokenizer)}")
        model = cpcompile.parallelize(
            model, tp=spec.tp, cp=spec.cp, dp=spec.dp, combine=spec.combine, kv_interleave=spec.kv_interleave,
            max_length=max_length, lowering=spec.lowering,
        )
        if rank == 0:
            print(f"generated ({'text' if tokenizer else 'token ids, tiny model without a tokenizer'}, row 0 of {spec.batch}):")
        streamer = _Streamer(tokenizer, show=rank == 0)
        pad = model.generation_config.pad_token_id
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=spec.max_new_tokens, do_sample=False, streamer=streamer,
                return_dict_in_generate=True, pad_token_id=pad if pad is not None else model.generation_config.eos_token_id,
            )
        mine = {
            "rank": rank,
            "tokens": out.sequences.tolist(),
            "weight": _weight_bytes(model),
            "kv": out.past_key_values.kv_bytes(),
            "times": streamer.times,
        }
        every = [None] * spec.world
        dist.all_gather_object(every, mine)
        if rank != 0:
            return 0
        _print_table(spec, model, one_device, every)
        return _check_same_tokens(every)
    finally:
        dist.destroy_process_group()


def load(spec: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer or None, a label) for a tiny architecture name or a local HF directory."""
    import transformers

    from cpcompile.tiny import ARCHITECTURES, tiny_model

    if spec in ARCHITECTURES:
        return tiny_model(spec, seed=TINY_SEED, dtype=dtype).to(device), None, f"tiny {spec} (seeded random weights)"
    if not os.path.isdir(spec):
        raise ValueError(
            f"--model {spec!r} is neither a tiny architecture {ARCHITECTURES} nor a local model directory "
            "(nothing is downloaded)"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device).eval()
    has_tokenizer = any(os.path.exists(os.path.join(spec, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec) if has_tokenizer else None
    return model, tokenizer, f"{spec} ({type(model).__name__})"


def _prompt(spec: GenerateSpec, model, tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] ids and mask; the same on every rank (cpcompile checks that it is)."""
    vocab = model.config.get_text_config().vocab_size
    if spec.prompt_len is not None or (spec.prompt is None and tokenizer is None):
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(3, vocab, (spec.batch, spec.prompt_len or 8), generator=g)  # 0, 1, 2: pad, bos, eos
    elif tokenizer is not None:
        ids = tokenizer([spec.prompt or "Once upon a time"] * spec.batch, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([[b % vocab for b in spec.prompt.encode()]] * spec.batch)  # byte-level: id = UTF-8 byte
    ids = ids.to(device)
    return ids, torch.ones_like(ids)


def _show(ids: list[int], tokenizer) -> str:
    return repr(tokenizer.decode(ids)) if tokenizer is not None else " ".join(map(str, ids))


class _Streamer:
    """HF's streamer protocol (`put`, `end`): timestamps every step; prints row 0's new tokens on rank 0."""

    def __init__(self, tokenizer, show: bool):
        self.tokenizer, self.show = tokenizer, show
        self.times: list[float] = []  # [prompt seen, token 1, token 2, ...] (perf_counter seconds)
        self.ids: list[int] = []
        self.printed = ""

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 1 or not self.show:  # the first put is the prompt
            return
        token = int(value.reshape(-1)[0])  # [B] -> row 0
        if self.tokenizer is None:
            print(f" {token}", end="", flush=True)
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text

    def end(self) -> None:
        if self.show:
            print(flush=True)


def _weight_bytes(model) -> int:
    try:  # counts the local shards the compiled graph reads, and each stand-in parameter once
        from cpcompile.parallelize import weight_bytes
    except ImportError:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return weight_bytes(model)


def _print_table(spec: GenerateSpec, model, one_device: dict, every: list[dict]) -> None:
    print()
    print(f"{'rank':>4} {'dp':>3} {'tp':>3} {'cp':>3} {'weight bytes':>14} {'of 1 device':>11} {'KV bytes':>12} {'of 1 device':>11}")
    for s in every:
        cp_rank = s["rank"] % spec.cp
        tp_rank = s["rank"] // spec.cp % spec.tp
        dp_rank = s["rank"] // (spec.cp * spec.tp)  # rank = (dp_rank·tp + tp_rank)·cp + cp_rank
        print(
            f"{s['rank']:>4} {dp_rank:>3} {tp_rank:>3} {cp_rank:>3} {s['weight']:>14,} "
            f"{s['weight'] / one_device['weight']:>11.1%} {s['kv']:>12,} {s['kv'] / one_device['kv']:>11.1%}"
        )
    print(f"{'1 device':>16} {one_device['weight']:>14,} {'':>11} {one_device['kv']:>12,}")
    print(f"collectives per decode step: {_collectives(model)}")
    t = every[0]["times"]
    n = len(t) - 1  # new tokens
    line = f"time: first token {1e3 * (t[1] - t[0]):.1f} ms (prefill + compile)" if n >= 1 else "time: no tokens"
    if n >= 2:
        line += f", second {1e3 * (t[2] - t[1]):.1f} ms (decode compile)"
    if n >= 3:
        line += f", then {1e3 * (t[-1] - t[2]) / (n - 2):.2f} ms/token over {n - 2} decode steps"
    print(line)


def _collectives(model) -> str:
    """From the pass report of the last graph compiled (the decode step): kind -> count."""
    state = getattr(model, "_cpcompile", None)
    reports = getattr(getattr(state, "backend", None), "reports", None)
    counts = reports[-1].counts.get("collectives") if reports else None
    if not isinstance(counts, dict):
        return "n/a"
    layers = _num_layers(model)
    used = {k: v for k, v in counts.items() if v}
    if not used:
        return "none"
    return ", ".join(f"{k} {v} ({v / layers:g}/layer over {layers} layers)" for k, v in used.items())


def _check_same_tokens(every: list[dict]) -> int:
    reference = every[0]["tokens"]
    divergent = [s["rank"] for s in every if s["tokens"] != reference]
    if not divergent:
        n = len(every)
        print(f"tokens: identical on all {n} ranks" if n > 1 else "tokens: 1 rank, nothing to compare")
        return 0
    for s in every:
        if s["rank"] in divergent:
            row = next(i for i, (a, b) in enumerate(zip(s["tokens"], reference)) if a != b)
            col = next(j for j, (a, b) in enumerate(zip(s["tokens"][row], reference[row])) if a != b)
            print(
                f"ERROR: rank {s['rank']} generated different tokens from rank 0: row {row}, position {col}: "
                f"{s['tokens'][row][col:col + 8]} vs {reference[row][col:col + 8]}",
                file=sys.stderr,
            )
    return 1


def _report_failures(spec: GenerateSpec, exitcodes: dict[int, int]) -> None:
    errors: dict[str, list[int]] = {}
    tracebacks = {}
    for rank in sorted(exitcodes):
        path = os.path.join(spec.error_dir, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                e = json.load(f)
            errors.setdefault(e["summary"], []).append(rank)
            tracebacks[rank] = e["traceback"]
        else:
            errors.setdefault(f"exited with code {exitcodes[rank]} before reporting an error", []).append(rank)
    for summary, ranks in errors.items():
        print(f"cpcompile generate: rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} failed: {summary}", file=sys.stderr)
    stopped = sorted(set(range(spec.world)) - set(exitcodes))
    if stopped:
        print(f"(rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))} stopped by the launcher after the first failure)", file=sys.stderr)
    if tracebacks and spec.show_traceback:
        rank = min(tracebacks)
        print(f"--- traceback of rank {rank} ---\n{tracebacks[rank]}", file=sys.stderr)
    elif tracebacks:
        print("(rerun with --traceback for the full traceback)", file=sys.stderr)


def _num_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""`python -m cpcompile generate`: start dp·tp·cp ranks on this machine and generate with HF's API.

The ranks are started by torch's own launcher machinery (`elastic_launch`, the engine behind
torchrun: c10d rendezvous on 127.0.0.1, one node, `nproc_per_node = dp·tp·cp`). Every rank loads
the model, calls `cpcompile.parallelize(model, tp=, cp=, dp=, ffn=, dp_inputs=, ...)` and
`model.generate(...)`; rank 0 streams row 0's new tokens as they come and, at the end, prints per
rank: weight and KV bytes against one device, the tokens its FFN processes per decode step and
the bytes its collectives send; then the collectives of one decode step, the time per token and
what each replica generated. Rank 0 also checks that the ranks that must agree produced the same
tokens: every rank with dp_inputs='global' (each gets the whole batch back), the ranks of each
replica with dp_inputs='local'.

Requests: with dp_inputs='global' every rank passes the same batch of `batch` rows (default dp,
one per replica; the library refuses fewer than dp). With dp_inputs='local' replica d passes its
own requests: `batch + d` rows (default batch 1) of `prompt_len + 3·d` seeded random ids (seed
1234 + d), or the `--prompt` text on each row, so the replicas differ in batch size and length.

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
from cpcompile._hf import output_cache

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
    ffn: str = "tp"
    """FFN placement: 'tp', 'sp' or 'world_tp' (cpcompile.parallelize)."""
    dp_inputs: str = "global"
    """'global': every rank passes the same batch; 'local': each replica its own requests."""
    kv_interleave: int = 1
    lowering: str = "inductor"
    prompt: str | None = None
    """Text prompt; for a tiny model (no tokenizer) its UTF-8 bytes are the token ids."""
    prompt_len: int | None = None
    """A prompt of this many seeded random token ids (instead of `prompt`)."""
    max_new_tokens: int = 64
    batch: int | None = None
    """Global mode: rows of the whole batch (None: dp). Local mode: replica d passes batch + d rows (None: 1)."""
    dtype: str = "float32"
    timeout_s: int = 600
    """Process-group timeout: a rank stuck in a collective fails after this long."""
    error_dir: str = ""
    show_traceback: bool = False

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.cp

    @property
    def local(self) -> bool:
        """Each replica passes its own requests (at dp = 1 the one replica's are everyone's)."""
        return self.dp > 1 and self.dp_inputs == "local"

    def rows(self, dp_rank: int) -> int:
        """Rows replica `dp_rank` passes to generate(): the whole batch in global mode."""
        if self.local:
            return (self.batch or 1) + dp_rank
        return self.batch or self.dp

    def replica(self, rank: int) -> int:
        return rank // (self.tp * self.cp)  # rank = (dp_rank·tp + tp_rank)·cp + cp_rank


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
        # every replica's requests (cheap, seeded), so that all ranks agree on one max_length
        prompts = [_prompt(spec, model, tokenizer, device, d) for d in range(spec.dp if spec.local else 1)]
        dp_rank = spec.replica(rank)
        ids, mask = prompts[dp_rank if spec.local else 0]
        max_length = max(p.shape[1] for p, _ in prompts) + spec.max_new_tokens
        one_device = {  # one device running this rank's requests (global mode: the whole batch)
            "weight": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv": KVCache(_num_layers(model), max_length).allocate(model, ids.shape[0]).kv_bytes(),
        }
        if rank == 0:
            print(
                f"cpcompile generate: {label}; dp={spec.dp} tp={spec.tp} cp={spec.cp} ({spec.world} rank{'s' if spec.world > 1 else ''}), "
                f"combine={spec.combine}, ffn={spec.ffn}, dp_inputs={spec.dp_inputs}, kv_interleave={spec.kv_interleave}, "
                f"lowering={spec.lowering}"
            )
            _print_prompts(spec, prompts, tokenizer)
        model = cpcompile.parallelize(
            model, tp=spec.tp, cp=spec.cp, dp=spec.dp, combine=spec.combine, ffn=spec.ffn, dp_inputs=spec.dp_inputs,
            kv_interleave=spec.kv_interleave, max_length=max_length, lowering=spec.lowering,
        )
        if rank == 0:
            whose = f"replica 0's row 0 of {ids.shape[0]}" if spec.local else f"row 0 of {ids.shape[0]}"
            print(f"generated ({'text' if tokenizer else 'token ids, tiny model without a tokenizer'}, {whose}):")
        streamer = _Streamer(tokenizer, show=rank == 0)
        pad = model.generation_config.pad_token_id
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=spec.max_new_tokens, do_sample=False, streamer=streamer,
                return_dict_in_generate=True, pad_token_id=pad if pad is not None else model.generation_config.eos_token_id,
            )
        reports = model._cpcompile.backend.reports
        decode = reports[-1].counts if len(reports) > 1 else {}  # [0] prefill, [-1] decode
        mine = {
            "rank": rank,
            "dp_rank": dp_rank,
            "prompt_len": ids.shape[1],
            "tokens": out.sequences.tolist(),
            "weight": _weight_bytes(model),
            "kv": output_cache(out).kv_bytes(),
            "one_device": one_device,
            "ffn_tokens": decode.get("ffn_tokens"),
            "collectives": decode.get("collectives"),
            "collective_bytes": decode.get("collective_bytes"),
            "times": streamer.times,
        }
        every = [None] * spec.world
        dist.all_gather_object(every, mine)
        if rank != 0:
            return 0
        _print_table(spec, _num_layers(model), every)
        _print_replicas(spec, every, tokenizer)
        return _check_same_tokens(spec, every)
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


def _prompt(spec: GenerateSpec, model, tokenizer, device, dp_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] ids and mask of replica `dp_rank`'s requests (global mode: everyone's, dp_rank 0).
    Local mode: batch + d rows of prompt_len + 3·d seeded ids (seed 1234 + d), or the text on each row."""
    vocab = model.config.get_text_config().vocab_size
    rows, extra = spec.rows(dp_rank), (3 * dp_rank if spec.local else 0)
    if spec.prompt_len is not None or (spec.prompt is None and tokenizer is None):
        g = torch.Generator().manual_seed(1234 + dp_rank)
        ids = torch.randint(3, vocab, (rows, (spec.prompt_len or 8) + extra), generator=g)  # 0, 1, 2: pad, bos, eos
    elif tokenizer is not None:
        ids = tokenizer([spec.prompt or "Once upon a time"] * rows, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([[b % vocab for b in spec.prompt.encode()]] * rows)  # byte-level: id = UTF-8 byte
    ids = ids.to(device)
    return ids, torch.ones_like(ids)


def _print_prompts(spec: GenerateSpec, prompts: list[tuple[torch.Tensor, torch.Tensor]], tokenizer) -> None:
    if not spec.local:
        ids = prompts[0][0]
        print(f"prompt ({ids.shape[1]} tokens): {_show(ids[0].tolist(), tokenizer)}")
        if spec.dp > 1:
            from cpcompile.data_parallel import split_rows

            print(f"rows per replica: {split_rows(ids.shape[0], spec.dp)} (a global batch of {ids.shape[0]} split over dp={spec.dp})")
        return
    print("prompts (dp_inputs='local': each replica passes its own requests):")
    for d, (ids, _) in enumerate(prompts):
        print(f"  replica {d}: {ids.shape[0]} row{'s' if ids.shape[0] > 1 else ''} x {ids.shape[1]} tokens, row 0: {_show(ids[0].tolist(), tokenizer)}")


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


def _print_table(spec: GenerateSpec, layers: int, every: list[dict]) -> None:
    print()
    print(
        f"{'rank':>4} {'dp':>3} {'tp':>3} {'cp':>3} {'weight bytes':>14} {'of 1 device':>11} {'KV bytes':>12} {'of 1 device':>11}"
        f"  {'FFN tokens/step':>15}  {'collective bytes/step':>21}"
    )
    for s in every:
        cp_rank = s["rank"] % spec.cp
        tp_rank = s["rank"] // spec.cp % spec.tp
        one = s["one_device"]
        sent = f"{sum(s['collective_bytes'].values()):,}" if s["collective_bytes"] is not None else "n/a"
        print(
            f"{s['rank']:>4} {s['dp_rank']:>3} {tp_rank:>3} {cp_rank:>3} {s['weight']:>14,} "
            f"{s['weight'] / one['weight']:>11.1%} {s['kv']:>12,} {s['kv'] / one['kv']:>11.1%}"
            f"  {_per_layer(s['ffn_tokens']):>15}  {sent:>21}"
        )
    firsts = [next(s for s in every if s["dp_rank"] == d) for d in range(spec.dp)] if spec.local else every[:1]
    for s in firsts:  # local mode: one device running that replica's requests
        label = f"1 device (dp {s['dp_rank']})" if spec.local else "1 device"
        print(f"{label:>16} {s['one_device']['weight']:>14,} {'':>11} {s['one_device']['kv']:>12,}")
    print(f"FFN tokens/step: {_ffn_tokens_note(spec, every[0]['ffn_tokens'], layers)}")
    print(f"collectives per decode step: {_collectives(every, layers)}")
    t = every[0]["times"]
    n = len(t) - 1  # new tokens
    line = f"time: first token {1e3 * (t[1] - t[0]):.1f} ms (prefill + compile)" if n >= 1 else "time: no tokens"
    if n >= 2:
        line += f", second {1e3 * (t[2] - t[1]):.1f} ms (decode compile)"
    if n >= 3:
        line += f", then {1e3 * (t[-1] - t[2]) / (n - 2):.2f} ms/token over {n - 2} decode steps"
    print(line)


def _per_layer(values: list[int] | None) -> str:
    """One number when every layer has it, else the per-layer list joined by '/'."""
    if not values:
        return "n/a"
    return f"{values[0]:,}" if len(set(values)) == 1 else "/".join(map(str, values))


def _ffn_tokens_note(spec: GenerateSpec, values: list[int] | None, layers: int) -> str:
    if not values:
        return "n/a (no decode step, or no FFN down projection recognised)"
    which = f"the same in all {len(values)} layers" if len(set(values)) == 1 else f"layer 0/1/.../{len(values) - 1}"
    scheme = {
        "sp": f"ffn='sp': ceil(T/cp={spec.cp}) of the replica's T tokens on each CP rank",
        "world_tp": f"ffn='world_tp': the tokens of all {spec.dp} replicas, each padded to the largest",
    }
    active = spec.ffn == "sp" and spec.cp > 1 or spec.ffn == "world_tp" and spec.dp > 1
    what = scheme[spec.ffn] if active else f"ffn='{spec.ffn}': all the replica's tokens on each of its ranks"
    return f"tokens into each layer's FFN down projection per decode step ({which}), padding included; {what}"


def _collectives(every: list[dict], layers: int) -> str:
    """Rank 0's decode-step graph (the pass report of the last graph compiled): kind -> count and bytes;
    count = n/layer x layers + what runs once per step (the logits' all-gather, sp's LM-head gather)."""
    counts, sent = every[0]["collectives"], every[0]["collective_bytes"]
    if not isinstance(counts, dict):
        return "n/a (no decode step)"
    used = {k: v for k, v in counts.items() if v}
    if not used:
        return "none"
    parts = []
    for k, v in used.items():
        per, rest = divmod(v, layers)
        how = ", ".join(([f"{per}/layer over {layers} layers"] if per else []) + ([f"+{rest} per step"] if rest else []))
        parts.append(f"{k} {v} ({how}; {sent[k]:,} bytes)")
    line = ", ".join(parts)
    differ = [s for s in every if s["collectives"] != counts]
    if differ:  # not expected: every rank runs the same passes on the same layout
        line = "rank 0: " + line + "".join(f"; rank {s['rank']}: {s['collectives']}" for s in differ)
    return line


def _print_replicas(spec: GenerateSpec, every: list[dict], tokenizer) -> None:
    """What each replica generated: its own requests (local) or its rows of the global batch."""
    if spec.dp == 1 and len(every[0]["tokens"]) == 1:
        return  # the streamed row is all there is
    print("generated per replica:" if spec.dp > 1 else "generated:")
    if not spec.local:
        from cpcompile.data_parallel import split_rows

        rows = split_rows(len(every[0]["tokens"]), spec.dp)
    for d in range(spec.dp):
        ranks = [s["rank"] for s in every if s["dp_rank"] == d]
        first = next(s for s in every if s["dp_rank"] == d)
        tokens = first["tokens"] if spec.local else every[0]["tokens"]
        start = 0 if spec.local else sum(rows[:d])
        stop = len(tokens) if spec.local else start + rows[d]
        who = f"ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"rank {ranks[0]}"
        span = f"row {start}" if stop - start == 1 else f"rows {start}-{stop - 1}"
        if spec.dp > 1:
            whose = f"its own {span}" if spec.local else f"{span} of the global batch"
            print(f"  replica {d} ({who}): {whose}, prompt {first['prompt_len']} tokens")
        for r in range(start, stop):
            print(f"{'    ' if spec.dp > 1 else '  '}row {r}: {_show(tokens[r][first['prompt_len']:], tokenizer)}")


def _check_same_tokens(spec: GenerateSpec, every: list[dict]) -> int:
    """Global mode: every rank returns the whole batch, so all must agree with rank 0. Local mode: each
    replica has its own requests, so the ranks of a replica must agree with its first rank."""
    groups = [[s for s in every if s["dp_rank"] == d] for d in range(spec.dp)] if spec.local else [every]
    divergent = []
    for group in groups:
        reference = group[0]
        for s in group:
            if s["tokens"] == reference["tokens"]:
                continue
            divergent.append(s["rank"])
            row = next((i for i, (a, b) in enumerate(zip(s["tokens"], reference["tokens"])) if a != b), 0)
            col = next((j for j, (a, b) in enumerate(zip(s["tokens"][row], reference["tokens"][row])) if a != b), 0)
            print(
                f"ERROR: rank {s['rank']} generated different tokens from rank {reference['rank']}: row {row}, position {col}: "
                f"{s['tokens'][row][col:col + 8]} vs {reference['tokens'][row][col:col + 8]}",
                file=sys.stderr,
            )
    if divergent:
        return 1
    n = len(every)
    if n == 1:
        print("tokens: 1 rank, nothing to compare")
    elif spec.local:
        size = spec.tp * spec.cp
        print(f"tokens: identical on the {size} ranks of each replica ({spec.dp} replicas, each its own requests)"
              if size > 1 else f"tokens: {spec.dp} replicas of 1 rank, each its own requests, nothing to compare")
    else:
        print(f"tokens: identical on all {n} ranks")
    return 0


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

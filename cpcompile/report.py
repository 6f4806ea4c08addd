"""What `python -m cpcompile generate` prints (cpcompile/launch.py starts the ranks and runs them).

Rank 0 prints the prompts, then streams row 0's new tokens as they come (`Streamer`, which also
timestamps every step on every rank). At the end, from what every rank gathered to rank 0, it
prints per rank: weight and KV bytes against one device, the tokens its FFN processes per decode
step and the bytes its collectives send; then the collectives of one decode step, the time per
token and what each replica generated, and checks that the ranks that must agree produced the
same tokens (`check_same_tokens`: every rank with dp_inputs='global', the ranks of each replica
with dp_inputs='local'). When ranks fail, the parent prints each distinct error once, naming the
ranks that raised it, from the files the ranks wrote (`error_file`, `report_failures`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cpcompile.launch import GenerateSpec


def error_file(error_dir: str, rank: int) -> str:
    """Where a failing rank writes {"summary", "traceback"} (JSON) for the parent to report."""
    return os.path.join(error_dir, f"rank{rank}.json")


def print_prompts(spec: GenerateSpec, prompts: list[tuple[torch.Tensor, torch.Tensor]], tokenizer) -> None:
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


class Streamer:
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


def print_table(spec: GenerateSpec, layers: int, every: list[dict]) -> None:
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


def print_replicas(spec: GenerateSpec, every: list[dict], tokenizer) -> None:
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


def check_same_tokens(spec: GenerateSpec, every: list[dict]) -> int:
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


def report_failures(spec: GenerateSpec, exitcodes: dict[int, int]) -> None:
    errors: dict[str, list[int]] = {}
    tracebacks = {}
    for rank in sorted(exitcodes):
        path = error_file(spec.error_dir, rank)
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

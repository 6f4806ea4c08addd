"""`python -m cpcompile generate`: start dp·tp·cp ranks on this machine and generate with HF's API.

The ranks are started by torch's own launcher machinery (`elastic_launch`, the engine behind
torchrun: c10d rendezvous on 127.0.0.1, one node, `nproc_per_node = dp·tp·cp`). Every rank loads
the model, builds its requests, calls `cpcompile.parallelize(model, tp=, cp=, dp=, ffn=,
dp_inputs=, ...)` and `model.generate(...)`, then gathers what it measured (bytes, collectives,
step times, tokens) to rank 0, which prints it: what is printed, and the check that the ranks
that must agree produced the same tokens, live in cpcompile/report.py.

Requests: with dp_inputs='global' every rank passes the same batch of `batch` rows (default dp,
one per replica; the library refuses fewer than dp). With dp_inputs='local' replica d passes its
own requests: `batch + d` rows (default batch 1) of `prompt_len + 3·d` seeded random ids (seed
1234 + d), or the `--prompt` text on each row, so the replicas differ in batch size and length.

Failures: a rank that raises writes its error to a file and exits 1 (the launcher then stops the
other ranks, which would otherwise wait in a collective); the parent then reports each distinct
error once (`report.report_failures`).
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
import traceback
import uuid
from dataclasses import dataclass

import torch
from cpcompile._hf import output_cache
from cpcompile.report import (
    Streamer, check_same_tokens, error_file, print_prompts, print_replicas, print_table, report_failures,
)

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
            report_failures(spec, {r: f.exitcode for r, f in e.failures.items()})
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
        with open(error_file(spec.error_dir, rank), "w") as f:
            json.dump({"summary": summary, "traceback": traceback.format_exc()}, f)
        sys.exit(1)  # not an exception: no per-rank traceback on stderr; the agent stops the others


def _generate_on_rank(spec: GenerateSpec, rank: int) -> int:
    import torch.distributed as dist

    import cpcompile
    from cpcompile.cache import KVCache
    from cpcompile.sharding import weight_bytes

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
            print_prompts(spec, prompts, tokenizer)
        model = cpcompile.parallelize(
            model, tp=spec.tp, cp=spec.cp, dp=spec.dp, combine=spec.combine, ffn=spec.ffn, dp_inputs=spec.dp_inputs,
            kv_interleave=spec.kv_interleave, max_length=max_length, lowering=spec.lowering,
        )
        if rank == 0:
            whose = f"replica 0's row 0 of {ids.shape[0]}" if spec.local else f"row 0 of {ids.shape[0]}"
            print(f"generated ({'text' if tokenizer else 'token ids, tiny model without a tokenizer'}, {whose}):")
        streamer = Streamer(tokenizer, show=rank == 0)
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
            "weight": weight_bytes(model),  # the local shards the compiled graph reads
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
        print_table(spec, _num_layers(model), every)
        print_replicas(spec, every, tokenizer)
        return check_same_tokens(spec, every)
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


def _num_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""cpcompile/report.py: what `python -m cpcompile generate` prints, from made-up per-rank results.

No ranks are started: `every` is what `_generate_on_rank` gathers to rank 0. The numbers are
those of `python -m cpcompile generate --tp 2 --cp 2` (tiny llama, 2 layers), so the expected
lines are the CLI's own (tests/test_cli_generate.py runs the launcher end to end).
"""

import json

import pytest
import torch

from cpcompile.launch import GenerateSpec
from cpcompile.report import (
    Streamer,
    check_same_tokens,
    error_file,
    print_prompts,
    print_replicas,
    print_table,
    report_failures,
)

LAYERS = 2
COUNTS = {"all_reduce": 5, "all_to_all": 2, "all_gather": 1, "reduce_scatter": 0}
BYTES = {"all_reduce": 1280, "all_to_all": 272, "all_gather": 256, "reduce_scatter": 0}


def _rank(rank: int, spec: GenerateSpec, tokens=None, times=(0.0, 1.0, 3.0, 3.5, 4.0)) -> dict:
    return {
        "rank": rank, "dp_rank": spec.replica(rank), "prompt_len": 2,
        "tokens": tokens if tokens is not None else [[1, 2, 7, 8, 9]],
        "weight": 124_224, "kv": 9_472, "one_device": {"weight": 427_264, "kv": 37_376},
        "ffn_tokens": [1] * LAYERS, "collectives": dict(COUNTS), "collective_bytes": dict(BYTES), "times": list(times),
    }


def test_table_bytes_collectives_and_time(capsys):
    spec = GenerateSpec(model="llama", tp=2, cp=2)
    print_table(spec, LAYERS, [_rank(r, spec) for r in range(4)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[3] == "   1   0   0   1        124,224       29.1%        9,472       25.3%                1                  1,808"
    assert lines[4].split()[:4] == ["2", "0", "1", "0"]  # rank = tp_rank·cp + cp_rank
    assert lines[6] == "        1 device        427,264                   37,376"
    assert lines[8] == (
        "collectives per decode step: all_reduce 5 (2/layer over 2 layers, +1 per step; 1,280 bytes), "
        "all_to_all 2 (1/layer over 2 layers; 272 bytes), all_gather 1 (+1 per step; 256 bytes)"
    )
    # 4 new tokens at t = 1, 3, 3.5, 4 s after the prompt: 1000 ms, 2000 ms, then 2 steps of 500 ms
    assert lines[9] == ("time: first token 1000.0 ms (prefill + compile), second 2000.0 ms (decode compile), "
                        "then 500.00 ms/token over 2 decode steps")


def test_table_names_a_rank_whose_collectives_differ(capsys):
    spec = GenerateSpec(model="llama", cp=2)
    every = [_rank(r, spec) for r in range(2)]
    every[1]["collectives"] = {**COUNTS, "all_to_all": 3}
    print_table(spec, LAYERS, every)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("collectives"))
    assert line.startswith("collectives per decode step: rank 0: all_reduce 5")
    assert line.endswith("; rank 1: {'all_reduce': 5, 'all_to_all': 3, 'all_gather': 1, 'reduce_scatter': 0}")


def test_ffn_tokens_per_layer_and_no_decode_step(capsys):
    spec = GenerateSpec(model="llama", cp=2, ffn="sp")
    every = [_rank(r, spec) for r in range(2)]
    for s in every:
        s["ffn_tokens"] = [3, 5]
    every[0]["collectives"] = every[0]["collective_bytes"] = every[1]["collective_bytes"] = None
    every[0]["times"] = [0.0]
    print_table(spec, LAYERS, every)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[-2:] == ["3/5", "n/a"]
    assert lines[-3] == ("FFN tokens/step: tokens into each layer's FFN down projection per decode step (layer 0/1/.../1), "
                         "padding included; ffn='sp': ceil(T/cp=2) of the replica's T tokens on each CP rank")
    assert lines[-2:] == ["collectives per decode step: n/a (no decode step)", "time: no tokens"]


def test_same_tokens_global_and_local(capsys):
    spec = GenerateSpec(model="llama", tp=2, cp=2)
    assert check_same_tokens(spec, [_rank(r, spec) for r in range(4)]) == 0
    assert capsys.readouterr().out == "tokens: identical on all 4 ranks\n"

    local = GenerateSpec(model="llama", dp=2, cp=2, dp_inputs="local")
    every = [_rank(r, local, tokens=[[r // 2] * 5]) for r in range(4)]  # replicas differ, their ranks agree
    assert check_same_tokens(local, every) == 0
    assert capsys.readouterr().out == "tokens: identical on the 2 ranks of each replica (2 replicas, each its own requests)\n"


def test_divergent_rank_is_named_with_row_and_position(capsys):
    spec = GenerateSpec(model="llama", cp=2)
    every = [_rank(0, spec, tokens=[[1, 2, 3], [4, 5, 6]]), _rank(1, spec, tokens=[[1, 2, 3], [4, 9, 6]])]
    assert check_same_tokens(spec, every) == 1
    err = capsys.readouterr().err
    assert err == "ERROR: rank 1 generated different tokens from rank 0: row 1, position 1: [9, 6] vs [5, 6]\n"


def test_replicas_print_their_rows_of_the_global_batch(capsys):
    spec = GenerateSpec(model="llama", dp=2, cp=2, batch=3)
    tokens = [[0, 0, 10, 11], [0, 0, 20, 21], [0, 0, 30, 31]]
    print_replicas(spec, [_rank(r, spec, tokens=tokens) for r in range(4)], tokenizer=None)
    assert capsys.readouterr().out.splitlines() == [
        "generated per replica:",
        "  replica 0 (ranks 0-1): rows 0-1 of the global batch, prompt 2 tokens",
        "    row 0: 10 11",
        "    row 1: 20 21",
        "  replica 1 (ranks 2-3): row 2 of the global batch, prompt 2 tokens",
        "    row 2: 30 31",
    ]


def test_prompts_local_mode(capsys):
    spec = GenerateSpec(model="llama", dp=2, dp_inputs="local")
    ids = [torch.tensor([[5, 6]]), torch.tensor([[7, 8, 9], [1, 2, 3]])]
    print_prompts(spec, [(i, torch.ones_like(i)) for i in ids], tokenizer=None)
    assert capsys.readouterr().out.splitlines() == [
        "prompts (dp_inputs='local': each replica passes its own requests):",
        "  replica 0: 1 row x 2 tokens, row 0: 5 6",
        "  replica 1: 2 rows x 3 tokens, row 0: 7 8 9",
    ]


def test_streamer_prints_row_0_and_times_every_step(capsys):
    shown, hidden = Streamer(None, show=True), Streamer(None, show=False)
    for s in (shown, hidden):
        s.put(torch.tensor([[1, 2, 3], [4, 5, 6]]))  # the prompt: timed, not printed
        s.put(torch.tensor([7, 8]))
        s.put(torch.tensor([9, 10]))
        s.end()
    assert capsys.readouterr().out == " 7 9\n"
    assert len(shown.times) == len(hidden.times) == 3


@pytest.mark.parametrize("traceback", [False, True])
def test_failures_reported_once_per_error(tmp_path, capsys, traceback):
    spec = GenerateSpec(model="llama", tp=2, cp=2, error_dir=str(tmp_path), show_traceback=traceback)
    for rank in (0, 2):
        with open(error_file(spec.error_dir, rank), "w") as f:
            json.dump({"summary": "ValueError: bad mesh", "traceback": f"tb of rank {rank}"}, f)
    report_failures(spec, {0: 1, 2: 1, 3: -15})
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == [
        "cpcompile generate: ranks 0, 2 failed: ValueError: bad mesh",
        "cpcompile generate: rank 3 failed: exited with code -15 before reporting an error",
        "(rank 1 stopped by the launcher after the first failure)",
    ]
    assert err[3:] == (["--- traceback of rank 0 ---", "tb of rank 0"] if traceback
                       else ["(rerun with --traceback for the full traceback)"])

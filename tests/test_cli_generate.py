"""`python -m cpcompile generate` end to end: ranks started by torch's elastic launcher, HF's
generate() on the parallelized tiny Llama, the printed table checked against numbers computed
here (weight and KV bytes of one device, HF's own greedy tokens) and the decode step's
collectives against what `cpcompile.explain` says the scheme inserts."""

import collections
import re
import subprocess
import sys

import pytest
import torch

import cpcompile
from cpcompile.__main__ import main
from cpcompile.cache import KVCache
from cpcompile.tiny import tiny_model

PROMPT_LEN, NEW = 8, 8  # the CLI's default prompt for a tiny model: 8 seeded ids
KINDS = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter")


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:  # generous: ranks share a small machine
    cmd = [sys.executable, "-m", "cpcompile", "generate", "--model", "llama", "--max-new-tokens", str(NEW), "--lowering", "eager", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference():
    """One device: weight bytes, KV bytes for prompt + NEW tokens, HF eager greedy tokens."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return {
        "weight": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv": KVCache(2, PROMPT_LEN + NEW).allocate(model, 1).kv_bytes(),
        "prompt": ids[0].tolist(),
        "tokens": out[0, PROMPT_LEN:].tolist(),
    }


def _greedy(ids: torch.Tensor) -> list[list[int]]:
    """HF's own greedy new tokens on one device, per row."""
    with torch.no_grad():
        out = tiny_model("llama").generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def _rows(stdout: str) -> dict[int, tuple]:
    """rank -> (dp, tp, cp, weight bytes, KV bytes, FFN tokens/step, collective bytes/step) from the table."""
    num = r"([\d,]+)"
    rows = re.findall(rf"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+{num}\s+[\d.]+%\s+{num}\s+[\d.]+%\s+(\S+)\s+{num}$", stdout, re.M)
    n = lambda x: int(x.replace(",", ""))
    return {int(r[0]): (*map(int, r[1:4]), n(r[4]), n(r[5]), r[6], n(r[7])) for r in rows}


def _decode_collectives(stdout: str) -> dict[str, tuple[int, int]]:
    """kind -> (count, bytes) from the 'collectives per decode step' line."""
    line = next(x for x in stdout.splitlines() if x.startswith("collectives per decode step: "))
    found = re.findall(r"(\w+) (\d+) \([^;]*; ([\d,]+) bytes\)", line)
    return {k: (int(c), int(b.replace(",", ""))) for k, c, b in found}


def _explained(dp: int, tp: int, cp: int, ffn: str, dp_inputs: str) -> dict[str, int]:
    """What cpcompile.explain says one forward of the 2-layer tiny Llama issues, by kind (zeros left out)."""
    report = cpcompile.explain(tiny_model("llama"), tp=tp, cp=cp, dp=dp, ffn=ffn)
    total = collections.Counter(c.kind for cs in report.layer_collectives().values() for c in cs)
    total.update(c.kind for c in report.forward_collectives() if dp_inputs == "global" or c.group != "dp")
    return {k: total[k] for k in KINDS if total[k]}


def _per_replica(stdout: str) -> dict[int, dict[int, list[int]]]:
    """replica -> row -> new token ids, from the 'generated per replica' block."""
    out, replica = {}, None
    for line in stdout.splitlines()[stdout.splitlines().index("generated per replica:") + 1:]:
        if m := re.match(r"^  replica (\d+) ", line):
            replica = out.setdefault(int(m.group(1)), {})
        elif m := re.match(r"^    row (\d+): ([\d ]*)$", line):
            replica[int(m.group(1))] = [int(t) for t in m.group(2).split()]
        else:
            break
    return out


def _generated(stdout: str) -> list[int]:
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("generated (token ids"))
    return [int(t) for t in lines[i + 1].split()]


def test_one_rank_through_the_launcher(reference):
    r = _cli("--tp", "1", "--cp", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"prompt ({PROMPT_LEN} tokens): {' '.join(map(str, reference['prompt']))}" in out
    assert _generated(out) == reference["tokens"]  # HF's own greedy tokens on one device
    assert _rows(out) == {0: (0, 0, 0, reference["weight"], reference["kv"], "1", 0)}  # 1 token into each FFN, nothing sent
    assert re.search(rf"^\s+1 device\s+{reference['weight']:,}\s+{reference['kv']:,}$", out, re.M)
    assert "collectives per decode step: none" in out
    assert re.search(rf"then [\d.]+ ms/token over {NEW - 2} decode steps", out)
    assert "tokens: 1 rank, nothing to compare" in out


def test_two_cp_ranks_agree_and_hold_half_the_kv(reference):
    r = _cli("--tp", "1", "--cp", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert _generated(out) == reference["tokens"]
    rows = _rows(out)
    assert sorted(rows) == [0, 1] and [rows[r][:3] for r in (0, 1)] == [(0, 0, 0), (0, 0, 1)]  # cp innermost
    collectives = _decode_collectives(out)
    for _, _, _, weight, kv, ffn_tokens, sent in rows.values():
        assert weight < reference["weight"]  # o_proj and the FFN are split over the replica's 2 ranks
        assert kv <= 0.6 * reference["kv"]  # half the slots (+ at most a sink slot)
        assert ffn_tokens == "1"  # ffn='tp': every rank of the replica runs the FFN on its one token
        assert sent == sum(b for _, b in collectives.values())
    assert {k: c for k, (c, _) in collectives.items()} == _explained(1, 1, 2, "tp", "global") == {"all_reduce": 5, "all_to_all": 2, "all_gather": 1}  # + the vocab-parallel embedding and LM head
    assert "tokens: identical on all 2 ranks" in out


def test_attention_dp_with_world_tp_ffn(reference):
    """dp=2, ffn='world_tp', global batch (default: one row per replica): every rank returns the whole
    batch, HF's tokens on both rows; each FFN runs on both replicas' tokens with half the weights."""
    r = _cli("--dp", "2", "--ffn", "world_tp")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    ids = torch.randint(3, 256, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1234))
    want = _greedy(ids)
    assert "rows per replica: [1, 1] (a global batch of 2 split over dp=2)" in out
    assert _generated(out) == want[0]
    assert _per_replica(out) == {0: {0: want[0]}, 1: {1: want[1]}}
    rows = _rows(out)
    assert sorted(rows) == [0, 1] and [rows[r][:3] for r in (0, 1)] == [(0, 0, 0), (1, 0, 0)]  # dp outermost
    collectives = _decode_collectives(out)
    assert {k: c for k, (c, _) in collectives.items()} == _explained(2, 1, 1, "world_tp", "global")
    assert _explained(2, 1, 1, "world_tp", "global") == {"all_gather": 3, "reduce_scatter": 2}  # 1+1/layer, the logits
    for _, _, _, weight, kv, ffn_tokens, sent in rows.values():
        assert weight < reference["weight"]  # the FFN split over both ranks
        assert kv == reference["kv"]  # one replica's row: the single-device KV of a batch of 1
        assert ffn_tokens == "2"  # both replicas' decode tokens in every layer
        assert sent == sum(b for _, b in collectives.values())
    assert re.search(rf"^\s+1 device\s+{reference['weight']:,}\s+{2 * reference['kv']:,}$", out, re.M)  # the batch of 2
    assert "tokens: identical on all 2 ranks" in out


def test_local_requests_per_replica_under_world_tp(reference):
    """dp_inputs='local': replica d passes 1 + d rows of 8 + 3d ids (seed 1234 + d); the FFN gathers both
    replicas' tokens padded to the larger (2 rows); each replica's tokens equal HF's on its own requests."""
    r = _cli("--dp", "2", "--ffn", "world_tp", "--dp-inputs", "local")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    prompts = [torch.randint(3, 256, (1 + d, PROMPT_LEN + 3 * d), generator=torch.Generator().manual_seed(1234 + d)) for d in (0, 1)]
    assert "  replica 1: 2 rows x 11 tokens, row 0: " + " ".join(map(str, prompts[1][0].tolist())) in out
    want = [_greedy(p) for p in prompts]
    assert _per_replica(out) == {0: {0: want[0][0]}, 1: {0: want[1][0], 1: want[1][1]}}
    rows = _rows(out)
    kv = lambda b: KVCache(2, PROMPT_LEN + 3 + NEW).allocate(tiny_model("llama"), b).kv_bytes()  # one max_length: the longest prompt's
    # under world_tp the replicas run the same shapes: both the bucket of the larger batch (2 rows)
    assert (rows[0][4], rows[1][4]) == (kv(2), kv(2))
    assert rows[0][5] == rows[1][5] == "4"  # 2 replicas x the larger replica's 2 decode tokens
    counts = {k: c for k, (c, _) in _decode_collectives(out).items()}
    assert counts == _explained(2, 1, 1, "world_tp", "local") == {"all_gather": 2, "reduce_scatter": 2}  # no logits gather
    assert "tokens: 2 replicas of 1 rank, each its own requests, nothing to compare" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dp", "2", "--batch", "1"], r"--batch 1 with --dp 2: cpcompile: a global batch of 1 row\(s\) cannot be split over dp=2 replicas"),
        (["--ffn", "ring"], r"argument --ffn: invalid choice: 'ring'"),
        (["--dp-inputs", "each"], r"argument --dp-inputs: invalid choice: 'each'"),
        (["--dp", "0"], r"--dp=0; expected an integer >= 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_rank_starts(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cpcompile generate") and re.search(message, err), err


def test_error_in_parallelize_is_reported_once():
    r = _cli("--tp", "1", "--cp", "2", "--kv-interleave", "0")  # parallelize's own validation rejects it on every rank
    both = r.stdout + r.stderr
    assert r.returncode == 1
    assert both.count("kv_interleave=0; expected an integer >= 1") == 1, both
    assert re.search(r"cpcompile generate: ranks? [01](, 1)? failed: ValueError: cpcompile: kv_interleave=0", r.stderr)
    assert "Traceback" not in both and "rerun with --traceback" in r.stderr

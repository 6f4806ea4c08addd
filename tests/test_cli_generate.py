"""`python -m cpcompile generate` end to end: ranks started by torch's elastic launcher, HF's
generate() on the parallelized tiny Llama, the printed table checked against numbers computed
here (weight and KV bytes of one device, HF's own greedy tokens)."""

import re
import subprocess
import sys

import pytest
import torch

from cpcompile.cache import KVCache
from cpcompile.tiny import tiny_model

PROMPT_LEN, NEW = 8, 8  # the CLI's default prompt for a tiny model: 8 seeded ids


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
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


def _rows(stdout: str) -> dict[int, tuple[int, int, int, int, int]]:
    """rank -> (dp, tp, cp, weight bytes, KV bytes) from the table."""
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d,]+)\s+[\d.]+%\s+([\d,]+)\s+[\d.]+%$", stdout, re.M)
    return {int(r[0]): (*map(int, r[1:4]), int(r[4].replace(",", "")), int(r[5].replace(",", ""))) for r in rows}


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
    assert _rows(out) == {0: (0, 0, 0, reference["weight"], reference["kv"])}
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
    for _, _, _, weight, kv in rows.values():
        assert weight < reference["weight"]  # o_proj and the FFN are split over the replica's 2 ranks
        assert kv <= 0.6 * reference["kv"]  # half the slots (+ at most a sink slot)
    assert re.search(r"collectives per decode step: .*all_to_all \d+", out)
    assert "tokens: identical on all 2 ranks" in out


def test_error_in_parallelize_is_reported_once():
    r = _cli("--tp", "1", "--cp", "2", "--kv-interleave", "0")  # parallelize's own validation rejects it on every rank
    both = r.stdout + r.stderr
    assert r.returncode == 1
    assert both.count("kv_interleave=0; expected an integer >= 1") == 1, both
    assert re.search(r"cpcompile generate: ranks? [01](, 1)? failed: ValueError: cpcompile: kv_interleave=0", r.stderr)
    assert "Traceback" not in both and "rerun with --traceback" in r.stderr

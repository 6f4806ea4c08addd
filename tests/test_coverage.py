"""CI sample of `benchmarks/coverage.py` (docs/coverage.md): a few architectures from across
transformers, each at the meshes listed, must give the outcome recorded here.

The full sweep (every decoder-only causal LM transformers ships) is a command with its own time
budget (`python benchmarks/coverage.py`, docs/coverage.md); this file runs 10 of them (about 3 minutes
on an idle 2-core machine). The sample spans the outcomes: exact architectures of several
families (Gemma 2 softcaps + sliding window, Qwen3 q/k norms, GPT-NeoX partial rotary + parallel
residual, BERT run as a decoder; GPT-2's fused Conv1D at tp2 x cp2; Phi-3's fused qkv is in the
property suite; MiniCPM3's MLA, absorbed, its latent split over tp2: no test of its own), refusals (BLOOM's ALiBi as a CaptureError, Mamba's state-space
cache named as such, GPT-OSS's attention sinks named by the model's source line, GPT-Neo's causal bias sliced by the
cache's length, refused at the first step shape it cannot trace). The sweep itself uses a one-rank World for
1x1; here 1x1 runs in this process (the suite's worlds are 2 and 4 ranks). When cpcompile improves, an outcome here
changes: update the table (and docs/coverage.md) in the same commit. No case may be `wrong`.
"""

import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `benchmarks` is a directory of scripts, imported as a namespace package
    sys.path.insert(0, _ROOT)

from benchmarks import coverage  # noqa: E402

# (architecture, mesh TPxCP) -> the outcome recorded by the sweep (docs/coverage.md).
EXPECTED = {
    ("gpt_oss", "1x1"): "refused",
    ("gpt_neo", "1x1"): "refused",
    ("qwen3", "1x1"): "exact",
    ("gemma2", "1x1"): "exact",
    ("gpt_neox", "1x1"): "exact",
    ("bert", "1x1"): "exact",
    ("gpt2", "2x2"): "exact",
    ("minicpm3", "2x1"): "exact",
    ("bloom", "1x1"): "refused",
    ("mamba", "1x1"): "refused",
}
# What a refusal must name (a substring of its reason).
REASONS = {
    ("gpt_oss", "1x1"): "modeling_gpt_oss.py",  # the attention with sinks: the model's own source line
    ("gpt_neo", "1x1"): "modeling_gpt_neo.py:121",  # a causal bias sliced by the cache's length, at a later step shape
    ("mamba", "1x1"): "not a key/value cache",
}


def test_sample_spans_the_outcomes():
    outcomes = set(EXPECTED.values())
    assert {"exact", "refused"} <= outcomes
    assert len({a for a, _ in EXPECTED}) >= 10
    assert "wrong" not in outcomes  # the goal: nothing silently wrong


@pytest.mark.parametrize("arch,mesh", sorted(EXPECTED), ids=[f"{a}-{m}" for a, m in sorted(EXPECTED)])
def test_outcome(arch, mesh, request):
    assert coverage.check_reference(arch) is None, f"{arch}'s tiny config no longer builds"
    tp, cp = coverage.parse_mesh(mesh)
    world = request.getfixturevalue(f"world{tp * cp}") if tp * cp > 1 else None  # 1x1: in this process
    r = coverage.run_case(arch, mesh, worlds=None, world=world, timeout_s=300)
    assert r["outcome"] != "wrong", r.get("detail", r["reason"])
    assert r["outcome"] == EXPECTED[arch, mesh], (
        f"{arch} at {mesh}: {r['outcome']} ({r['reason']}); the table records {EXPECTED[arch, mesh]}. "
        "If cpcompile changed this on purpose, update EXPECTED and docs/coverage.md."
    )
    if r["outcome"] == "exact":
        assert r["max_abs_error"] <= 1e-4  # FP32_TOLERANCE.atol
    if (arch, mesh) in REASONS:
        assert REASONS[arch, mesh] in r["reason"], r["reason"]


def test_merge_later_runs_replace_earlier(tmp_path):
    import json

    def run(path, commit, meshes, results):
        doc = dict(versions=dict(cpcompile_commit=commit), meshes=meshes, seconds=10.0, skipped={}, swept=["a", "b"],
                   results=[dict(arch=a, mesh=m, outcome=o, reason="") for a, m, o in results])
        path.write_text(json.dumps(doc))
        return str(path)

    first = run(tmp_path / "1.json", "c1", ["2x2", "1x1"], [("a", "2x2", "failed"), ("b", "2x2", "exact")])
    second = run(tmp_path / "2.json", "c2", ["2x1"], [("a", "2x2", "refused"), ("a", "2x1", "refused")])
    data = coverage.merge([first, second])
    assert data["meshes"] == ["1x1", "2x1", "2x2"]
    by = {(r["arch"], r["mesh"]): (r["outcome"], r["commit"]) for r in data["results"]}
    assert by == {("a", "2x2"): ("refused", "c2"), ("b", "2x2"): ("exact", "c1"), ("a", "2x1"): ("refused", "c2")}
    assert data["versions"]["commits"] == {"c2": 2, "c1": 1} and data["seconds"] == 20.0
    assert data["summary"]["totals"]["2x2"] == {"refused": 1, "exact": 1}

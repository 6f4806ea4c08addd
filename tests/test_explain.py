import collections
import re
import subprocess
import sys

import pytest

import cpcompile
from cpcompile.tiny import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_explain_reports_every_layer(arch):
    report = cpcompile.explain(tiny_model(arch), tp=2, cp=2)
    text = str(report)
    assert report.ok, text
    assert text.count("attention, Hq=4") == 2  # both layers, with their head counts
    assert "lm_head.weight" in text and "vocab/replica" in text  # the vocab split over the tp*cp ranks
    assert "row/replica" in text  # o_proj over the tp*cp ranks
    assert re.search(r"valid \(tp, cp\)", text, re.I) and "(2, 2)" in text


def test_explain_names_the_mesh_problem_and_the_valid_meshes():
    report = cpcompile.explain(tiny_model("llama"), tp=8, cp=1)
    assert not report.ok
    assert "Hq=4 query heads are not divisible by tp=8" in str(report)
    assert report.valid == [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]


def _decode_counts(report, dp_inputs="global"):
    """explain's collectives summed over one forward, by kind (as PassReport counts["collectives"])."""
    total = collections.Counter(c.kind for cs in report.layer_collectives().values() for c in cs)
    for c in report.forward_collectives():
        total[c.kind] += dp_inputs == "global" or c.group != "dp"  # the logits' gather is global mode's only
    return {k: total[k] for k in ("all_reduce", "all_to_all", "all_gather", "reduce_scatter")}


# dp, tp, cp, combine, ffn -> per-layer kinds over a 2-layer Llama, and the once-per-forward extra
# (DESIGN.md sections 2-3; the same table as tests/distributed/test_data_parallel.py's expected counts).
# Once per forward at tp*cp > 1: the vocab-parallel embedding (an all-reduce over the replica, or under
# 'sp' a reduce-scatter over cp + an all-reduce over tp) and the LM head's all-gather of the logits.
SCHEMES = [
    ((1, 2, 2, "all_to_all", "tp"), dict(all_to_all=1, all_reduce=2), dict(all_reduce=1, all_gather=1)),
    ((2, 2, 2, "all_to_all", "sp"), dict(all_gather=1, all_to_all=1, reduce_scatter=1, all_reduce=2),
     dict(all_gather=3, reduce_scatter=1, all_reduce=1)),
    ((2, 1, 2, "all_to_all", "sp"), dict(all_gather=1, all_to_all=1, reduce_scatter=1), dict(all_gather=3, reduce_scatter=1)),
    ((2, 1, 1, "all_to_all", "world_tp"), dict(all_gather=1, reduce_scatter=1), dict(all_gather=1)),  # tp*cp = 1: no vocab split
    ((2, 2, 1, "ag_rs", "world_tp"), dict(all_gather=1, reduce_scatter=1, all_reduce=2), dict(all_gather=2, all_reduce=1)),
    ((2, 1, 2, "ag_rs", "world_tp"), dict(all_gather=2, reduce_scatter=2, all_reduce=2), dict(all_gather=2, all_reduce=1)),
    ((1, 2, 2, "all_gather", "sp"), dict(all_gather=2, all_reduce=2), dict(all_gather=2, reduce_scatter=1, all_reduce=1)),  # o stays row/tp
    ((1, 2, 1, "all_to_all", "sp"), dict(all_reduce=2), dict(all_reduce=1, all_gather=1)),  # cp=1: 'sp' is 'tp'
    ((1, 2, 1, "all_to_all", "world_tp"), dict(all_reduce=2), dict(all_reduce=1, all_gather=1)),  # dp=1: 'world_tp' is 'tp'
]


@pytest.mark.parametrize("mesh, per_layer, once", SCHEMES)
def test_explain_collectives_per_scheme(mesh, per_layer, once):
    dp, tp, cp, combine, ffn = mesh
    report = cpcompile.explain(tiny_model("llama"), tp=tp, cp=cp, dp=dp, combine=combine, ffn=ffn)
    assert report.ok, str(report)
    want = {k: 2 * per_layer.get(k, 0) + once.get(k, 0) for k in ("all_reduce", "all_to_all", "all_gather", "reduce_scatter")}
    assert _decode_counts(report) == want
    assert report.report.counts["collectives"] == want  # read off the graph the passes rewrote, as the lines are
    assert report.kept_full == [] and report.report.counts["local_kept_full"] == 0
    text = str(report)
    kinds = ", ".join(str(c) for c in report.layer_collectives()[0]) or "none"
    assert f"collectives per forward, each layer (2): {kinds}" in text
    assert f"(combine={combine}, ffn={ffn}, kv_interleave=1)" in text
    assert f"valid (tp, cp) with combine={combine}, dp={dp}, ffn={ffn}: " in text


def test_explain_placements_follow_ffn():
    def placements(**kw):
        text = str(cpcompile.explain(tiny_model("llama"), **kw))
        return {role: re.search(rf"^\s+{role}\s+model\.layers\.0\.\S+\s+\[\d+, \d+\]\s+(\S+)$", text, re.M).group(1)
                for role in ("q", "o", "gate", "down")}

    assert placements(tp=2, cp=2) == dict(q="column/tp", o="row/replica", gate="column/replica", down="row/replica")
    assert placements(tp=2, cp=2, dp=2, ffn="sp") == dict(q="column/tp", o="row/replica", gate="column/tp", down="row/tp")
    assert placements(tp=1, cp=2, ffn="sp") == dict(q="replicate", o="row/replica", gate="replicate", down="replicate")
    assert placements(tp=2, cp=1, dp=2, ffn="world_tp") == dict(q="column/tp", o="row/replica", gate="column/world", down="row/world")


def test_explain_token_layout_line():
    text = str(cpcompile.explain(tiny_model("llama"), tp=1, cp=2, dp=2, ffn="sp"))
    assert re.search(r"^tokens: rows split over dp=2 replicas .*ffn='sp': outside attention each CP rank keeps ceil\(T/cp=2\)", text, re.M)
    text = str(cpcompile.explain(tiny_model("llama"), tp=2, dp=2, ffn="world_tp"))
    assert re.search(r"^tokens: .*ffn='world_tp': the FFN runs on the tokens of all 2 replicas .* 1/4 of its weights", text, re.M)
    assert "all_gather(dp)       the input of gate: every token of the dp group" in text
    assert "reduce_scatter(dp)   down partial sums, each dp rank keeping its share of the tokens" in text
    assert "all_reduce(replica)  down partial sums" in text


def test_explain_invalid_ffn_and_mesh_give_parallelizes_mesh_error():
    from cpcompile.passes.plan import MeshError

    model = tiny_model("llama")
    report = cpcompile.explain(model, tp=2, dp=2, ffn="ring")
    assert not report.ok and report.problems == ["ffn='ring' is not one of ('tp', 'sp', 'world_tp')"]
    text = str(report)
    assert "mesh does NOT fit (cpcompile.parallelize raises MeshError):" in text
    assert "this model cannot run at dp=2, tp=2, cp=1, combine='all_to_all', ffn='ring':" in text
    assert "collectives per forward" not in text  # nothing to describe for a mesh that does not fit
    # a real mesh problem at dp=2: the same message parallelize's validation raises, valid meshes at dp=2
    report = cpcompile.explain(model, tp=8, dp=2, ffn="world_tp")
    assert report.valid == [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]
    with pytest.raises(MeshError) as e:
        from cpcompile.passes.plan import validate_mesh

        validate_mesh(report.analysis.roles, report.analysis.sites, report.mesh)
    assert report.error == str(e.value)
    assert "Valid (tp, cp) for this model with combine='all_to_all', dp=2, ffn='world_tp': [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]" in str(report)


def test_explain_cli():
    res = subprocess.run(
        [sys.executable, "-m", "cpcompile", "explain", "--model", "gemma2", "--tp", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "eager attention, Hq=4 Hkv=2, Dk=16, scale=0.0625" in res.stdout and "softcap=50" in res.stdout


def test_explain_cli_dp_and_ffn():
    res = subprocess.run(
        [sys.executable, "-m", "cpcompile", "explain", "--model", "llama", "--dp", "2", "--tp", "2", "--ffn", "sp", "--cp", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "at tp=2, cp=2, dp=2 (combine=all_to_all, ffn=sp, kv_interleave=1)" in res.stdout
    assert "collectives per forward, each layer (2): all_gather(cp), all_to_all(cp), reduce_scatter(cp), all_reduce(tp), all_reduce(tp)" in res.stdout
    assert re.search(r"^\s+down\s+model\.layers\.1\.mlp\.down_proj\.weight\s+\[64, 128\]\s+row/tp$", res.stdout, re.M)


def test_explain_cli_refuses_bad_ffn_and_reports_a_bad_mesh():
    res = subprocess.run(
        [sys.executable, "-m", "cpcompile", "explain", "--model", "llama", "--ffn", "ring"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2  # argparse's message quotes the choices or not, by Python version
    assert re.search(r"argument --ffn: invalid choice: 'ring' \(choose from '?tp'?, '?sp'?, '?world_tp'?\)", res.stderr)
    res = subprocess.run(
        [sys.executable, "-m", "cpcompile", "explain", "--model", "llama", "--dp", "2", "--cp", "3", "--ffn", "sp"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 1
    assert "combine='all_to_all' needs Hq/tp=4 divisible by cp=3 (use 'all_gather')" in res.stdout
    assert "Valid (tp, cp) for this model with combine='all_to_all', dp=2, ffn='sp': [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]" in res.stdout


def test_cli_refuses_unknown_model():
    res = subprocess.run([sys.executable, "-m", "cpcompile", "explain", "--model", "nope"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "neither a built-in tiny architecture" in res.stderr


def test_parallel_mesh_without_a_process_group_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match=r"needs 2 ranks, but no process group is initialised.*torchrun --nproc-per-node 2"):
        cpcompile.parallelize(tiny_model("llama"), tp=2)


def test_backend_string_refuses_parallel_options():
    import torch

    with pytest.raises(Exception, match="use parallelize for a parallel model"):
        torch.compile(lambda x: x + 1, backend="cpcompile", options={"tp": 2})(torch.ones(2))


def test_explain_after_parallelize_is_refused():
    model = cpcompile.parallelize(tiny_model("llama"), lowering="eager")
    with pytest.raises(ValueError, match="before cpcompile.parallelize"):
        cpcompile.explain(model)


def test_vocab_replicate_keeps_the_embedding_and_head_whole():
    """vocab='replicate': the embedding and LM head stay whole (no collective outside the layers at
    dp = 1); the default splits them, an all-reduce and an all-gather over the replica."""
    model = tiny_model("llama")
    whole = cpcompile.explain(model, tp=2, cp=2, vocab="replicate")
    split = cpcompile.explain(model, tp=2, cp=2)
    placements = lambda r: {line.split()[2]: line.split()[-1] for line in str(r).splitlines() if line.startswith("outside layers:")}
    assert placements(whole) == {"embedding": "replicate", "lm_head": "replicate"}
    assert placements(split) == {"embedding": "vocab/replica", "lm_head": "vocab/replica"}
    assert [str(c) for c in whole.forward_collectives()] == []
    assert [str(c) for c in split.forward_collectives()] == ["all_reduce(replica)", "all_gather(replica)"]
    assert "vocab=replicate" in str(whole)


def test_explain_counts_are_the_rewritten_graphs():
    """tp=2, cp=2 Llama (H=64, Hq=4 of 16, V=256, fp32), one decode step of one row on rank 0: the
    collectives, the bytes each kind sends, and local_layouts' counts, as the passes left the graph."""
    report = cpcompile.explain(tiny_model("llama"), tp=2, cp=2)
    counts = report.report.counts
    assert counts["collectives"] == {"all_reduce": 5, "all_to_all": 2, "all_gather": 1, "reduce_scatter": 0}
    # all-reduces: 2 x (o, down) + the embedding, [1, 1, 64] fp32 each; all_to_all per layer: this TP rank's
    # 2 heads' o (2 x 16) and lse (2), 34 x 4 B; all_gather: the LM head's 64 of the 256 logits
    assert counts["collective_bytes"] == {"all_reduce": 5 * 64 * 4, "all_to_all": 2 * 136, "all_gather": 64 * 4,
                                          "reduce_scatter": 0}
    assert {k: counts[f"local_{k}"] for k in ("seeds", "local", "ends", "statistics", "kept_full")} == dict(
        seeds=12, local=54, ends=10, statistics=0, kept_full=0)
    text = str(report)
    assert ("one decode step on rank 0 (one row per replica), read off the rewritten graph: collectives all_reduce 5, "
            "all_to_all 2, all_gather 1, reduce_scatter 0; bytes sent all_reduce 1280, all_to_all 272, all_gather 256, "
            "reduce_scatter 0") in text
    assert "local layouts (local_layouts): seeds 12, local 54, ends 10, statistics 0, kept_full 0" in text
    assert "kept at full width: none" in text
    assert [str(c) for c in report.layer_collectives()[0]] == ["all_to_all(cp)", "all_reduce(replica)", "all_reduce(replica)"]
    assert [c.what for c in report.layer_collectives()[0]] == [
        "partial o and lse, 1/cp of the heads to each rank (Helix combine)", "o partial sums", "down partial sums"]


def test_explain_counts_the_norm_statistics_of_a_sharded_width():
    """OLMo-2 normalises q and k over the whole projection width: at tp=2 local_layouts all-reduces
    each norm's [.., 1] statistic over the tp group (2 per layer) instead of gathering q and k."""
    from benchmarks.coverage import build_model

    report = cpcompile.explain(build_model("olmo2"), tp=2)
    counts = report.report.counts
    assert counts["local_statistics"] == 4 and counts["local_kept_full"] == 0 and report.kept_full == []
    assert counts["collectives"] == {"all_reduce": 9, "all_to_all": 0, "all_gather": 1, "reduce_scatter": 0}
    per_layer = [str(c) for c in report.layer_collectives()[1]]
    assert per_layer == ["all_reduce(tp)", "all_reduce(tp)", "all_reduce(replica)", "all_reduce(replica)"]
    text = str(report)
    assert "collectives per forward, each layer (2): all_reduce(tp), all_reduce(tp), all_reduce(replica), all_reduce(replica)" in text
    assert "all_reduce(tp)       a norm's statistic over a sharded width (local_layouts)" in text
    assert "statistics 4, kept_full 0" in text and "kept at full width: none" in text

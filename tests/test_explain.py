import subprocess
import sys

import pytest

import cpcompile
from cpcompile.tiny import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_explain_reports_every_layer(arch):
    report = cpcompile.explain(tiny_model(arch), tp=2, cp=2)
    text = str(report)
    if arch == "deepseek_v3":
        assert not report.ok and "MLA attention" in text and report.valid == [(1, 1)]
    else:
        assert report.ok, text
    assert text.count("attention, Hq=4") == 2  # both layers, with their head counts
    assert "lm_head.weight" in text and "replicate" in text
    assert "row/replica" in text  # o_proj over the tp*cp ranks
    assert "valid (tp, cp)" in text and ("(2, 2)" in text or arch == "deepseek_v3")


def test_explain_names_the_mesh_problem_and_the_valid_meshes():
    report = cpcompile.explain(tiny_model("llama"), tp=8, cp=1)
    assert not report.ok
    assert "Hq=4 query heads are not divisible by tp=8" in str(report)
    assert report.valid == [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]


def test_explain_cli():
    res = subprocess.run(
        [sys.executable, "-m", "cpcompile", "explain", "--model", "gemma2", "--tp", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "eager attention, Hq=4 Hkv=2, Dk=16, scale=0.0625" in res.stdout and "softcap=50" in res.stdout


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

"""`assert_equivalent` itself: it passes on a correct parallel model, and a wrong one fails with a
report naming the step, the row, the errors, the mesh and a snippet that reproduces it."""

import functools

import pytest
import torch
import torch.distributed as dist

from cpcompile.testing import BF16_TOLERANCE, FP32_TOLERANCE, TOLERANCES, Tolerance, assert_equivalent
from cpcompile.testing.equivalence import compare, left_padded, reproduction, split_replicas
from cpcompile.tiny import tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12]]  # left padding; rows shorter than cp=2


def perturbed_on_rank(rank: int, weight: str, delta: float = 0.5, arch: str = "llama"):
    """A tiny model whose `weight` is off by `delta` on `rank` of the parallel run only."""
    model = tiny_model(arch, seed=1)
    if dist.is_initialized() and dist.get_rank() == rank:
        with torch.no_grad():
            model.get_parameter(weight).add_(delta)
    return model


def test_passes_on_a_correct_parallel_model(world2):
    result = assert_equivalent(functools.partial(tiny_model, "llama", seed=3), tp=1, cp=2, prompts=PROMPTS,
                               max_new_tokens=6, world=world2, combine="all_to_all", kv_interleave=2, lowering="eager")
    assert (result.steps, result.rows) == (6, 3)
    assert result.max_abs_error <= FP32_TOLERANCE.atol
    assert result.ranks_bitwise_equal and result.max_rank_error == 0.0
    assert result.tolerance == FP32_TOLERANCE


def test_single_device_mesh_runs_in_process():
    result = assert_equivalent(functools.partial(tiny_model, "qwen3"), tp=1, cp=1, prompts=[[5, 6, 7]],
                               max_new_tokens=3, lowering="eager")
    assert result.steps == 3 and result.max_abs_error <= FP32_TOLERANCE.atol


def test_wrong_parallel_model_fails_with_step_row_and_snippet(world2):
    # down_proj is row-parallel over the replica: rank 1's shard is wrong, the all-reduced
    # output (so every rank's logits) is wrong from the prefill on.
    factory = functools.partial(perturbed_on_rank, 1, "model.layers.0.mlp.down_proj.weight")
    with pytest.raises(AssertionError) as err:
        assert_equivalent(factory, tp=1, cp=2, prompts=PROMPTS, max_new_tokens=4, world=world2, combine="ag_rs", lowering="eager")
    report = str(err.value)
    assert "at step 0 (0 = prefill), batch row 0" in report
    assert "logits differ beyond tolerance: max abs error" in report and "max rel error" in report
    assert "tp=1, cp=2, dp=1, combine='ag_rs', ffn='tp', dp_inputs='global', kv_interleave=1" in report
    assert "prompt lengths [5, 2, 1], 4 steps" in report
    snippet = report.split("```python\n")[1].split("```")[0]
    compile(snippet, "<snippet>", "exec")  # valid python
    assert "functools.partial(perturbed_on_rank, 1, 'model.layers.0.mlp.down_proj.weight')" in snippet
    assert "from test_equivalence_check import perturbed_on_rank" in snippet
    assert f"prompts={PROMPTS!r}" in snippet and "max_new_tokens=4" in snippet and "combine='ag_rs'" in snippet


def test_attention_data_parallel_global_and_local(world2):
    # dp=2 over 3 rows: replica 0 runs rows 0-1, replica 1 row 2 (split_rows); in local mode
    # replica 1 is given only its one-token prompt, so its padding differs from the reference's.
    factory = functools.partial(tiny_model, "qwen3", seed=2)
    for dp_inputs, ffn in (("global", "tp"), ("local", "world_tp")):
        result = assert_equivalent(factory, tp=1, cp=1, dp=2, prompts=PROMPTS, max_new_tokens=4, world=world2,
                                   ffn=ffn, dp_inputs=dp_inputs, lowering="eager")
        assert (result.steps, result.rows) == (4, 3)
        assert result.max_abs_error <= FP32_TOLERANCE.atol and result.ranks_bitwise_equal


def test_replicas_are_given_their_rows_at_their_own_width():
    ids, mask = left_padded([[5, 6, 7, 8, 9], [10, 11], [12], [13, 14]], pad_id=0)
    forced = torch.arange(8).reshape(2, 4)  # [steps, B]
    local = split_replicas(ids, mask, forced, dp=3, dp_inputs="local")
    assert [list(r) for r in local.rows] == [[0, 1], [2], [3]] and local.local
    assert [i.tolist() for i, _, _ in local.inputs] == [[[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]], [[12]], [[13, 14]]]
    assert [f.tolist() for _, _, f in local.inputs] == [[[0, 1], [4, 5]], [[2], [6]], [[3], [7]]]
    glob = split_replicas(ids, mask, forced, dp=3, dp_inputs="global")
    assert not glob.local and all(i is ids for i, _, _ in glob.inputs)


def test_wrong_replica_is_named_with_its_rows(world2):
    # local mode: rank 1 is replica 1 (rows [2]); its FFN is wrong, replica 0's rows are right
    factory = functools.partial(perturbed_on_rank, 1, "model.layers.0.mlp.down_proj.weight")
    with pytest.raises(AssertionError) as err:
        assert_equivalent(factory, tp=1, cp=1, dp=2, prompts=PROMPTS, max_new_tokens=2, world=world2, dp_inputs="local",
                          lowering="eager")
    report = str(err.value)
    assert "at step 0 (0 = prefill), batch row 2 (replica 1's row 0; its ranks 1..1)" in report
    assert "tp=1, cp=1, dp=2, combine='all_to_all', ffn='tp', dp_inputs='local'" in report
    assert "rows per replica [2, 1]" in report
    snippet = report.split("```python\n")[1].split("```")[0]
    compile(snippet, "<snippet>", "exec")
    assert "dp=2" in snippet and "dp_inputs='local'" in snippet


def test_a_rank_that_disagrees_is_named(world2):
    # lm_head replicated (vocab='replicate'; vocab-parallel logits are all-gathered, so every rank would
    # hold the same wrong ones): only rank 1's logits are off.
    factory = functools.partial(perturbed_on_rank, 1, "lm_head.weight", 0.05)
    with pytest.raises(AssertionError, match=r"(?s)step 0 .*batch row 0.*rank 1 disagrees with rank 0"):
        assert_equivalent(factory, tp=1, cp=2, prompts=PROMPTS, max_new_tokens=2, world=world2, lowering="eager",
                          vocab="replicate")


def test_a_rank_that_disagrees_with_its_replica_is_named(world4):
    # dp=2 x cp=2, local: ranks 2 and 3 are replica 1 (row 2); lm_head replicated (vocab='replicate'),
    # so only rank 3's logits are off, and it is compared with rank 2 (rank 0 holds other rows).
    factory = functools.partial(perturbed_on_rank, 3, "lm_head.weight", 0.05)
    with pytest.raises(AssertionError, match=r"(?s)step 0 .*batch row 2 \(replica 1's row 0; its ranks 2..3\).*rank 3 disagrees with rank 2"):
        assert_equivalent(factory, tp=1, cp=2, dp=2, prompts=PROMPTS, max_new_tokens=2, world=world4, dp_inputs="local",
                          lowering="eager", vocab="replicate")


# ------------------------------------------------------------------ the comparison, on synthetic logits


def _logits(steps=4, rows=2, vocab=8):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(steps, rows, vocab, generator=g) * 10  # O(10), as the tiny models
    return ref, ref.argmax(-1)


def test_near_tie_is_allowed_and_later_steps_still_compared():
    ref, tokens = _logits()
    ref[1, 1, :2] = torch.tensor([30.0, 30.0 - 1e-4])  # near-tie at step 1, row 1: top-2 gap 1e-4
    tokens = ref.argmax(-1)
    par = ref.clone()
    par[1, 1, 1] += 5e-5 + 1e-4  # the parallel run picks the runner-up (error 1.5e-4 > atol)
    tol = Tolerance(atol=2e-4, rtol=0.0, near_tie=1e-3)
    result, failure = compare(ref, tokens, par, [], tol)
    assert failure is None
    assert [(t.step, t.row, t.reference_token, t.parallel_token) for t in result.near_ties] == [(1, 1, 0, 1)]
    par[3, 0, 2] += 1.0  # a real error after the near-tie is still found (forced decoding)
    _, failure = compare(ref, tokens, par, [], tol)
    assert (failure.step, failure.row) == (3, 0) and "logits differ" in failure.what


def test_token_change_without_near_tie_fails():
    ref, tokens = _logits()
    par = ref.clone()
    second = ref[2, 0].topk(2).indices[1]
    par[2, 0, second] = ref[2, 0].max() + 1.0
    _, failure = compare(ref, tokens, par, [], Tolerance(atol=10.0, rtol=0.0, near_tie=1e-3))
    assert (failure.step, failure.row) == (2, 0) and "no near-tie" in failure.what


def test_rank_divergence_reported_with_rank():
    ref, tokens = _logits()
    rank_err = torch.zeros(4, 2)
    rank_err[2, 1] = 1e-2
    result, failure = compare(ref, tokens, ref.clone(), [(1, 0, torch.zeros(4, 2)), (3, 2, rank_err)], FP32_TOLERANCE)
    assert (failure.step, failure.row) == (2, 1) and "rank 3 disagrees with rank 2" in failure.what  # local: its replica's first rank
    assert result.max_rank_error == pytest.approx(1e-2)


def test_tolerances_are_stated_per_dtype():
    assert TOLERANCES[torch.float32] == FP32_TOLERANCE == Tolerance(atol=1e-4, rtol=0.0, near_tie=1e-3)
    assert TOLERANCES[torch.bfloat16] == BF16_TOLERANCE and BF16_TOLERANCE.atol > FP32_TOLERANCE.atol


# ------------------------------------------------------------------ inputs


def test_prompts_are_left_padded():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="left padding"):
        left_padded((torch.tensor([[5, 6]]), torch.tensor([[1, 0]])), pad_id=0)
    with pytest.raises(ValueError, match="no tokens"):
        left_padded([[5], []], pad_id=0)


def test_bad_arguments_are_refused(world2):
    with pytest.raises(TypeError, match="cannot be pickled"):
        assert_equivalent(lambda: tiny_model("llama"), tp=1, cp=2, prompts=[[5]], max_new_tokens=1, world=world2)
    with pytest.raises(ValueError, match=r"the world has 2 ranks but dp\*tp\*cp = 1\*2\*2 = 4"):
        assert_equivalent(functools.partial(tiny_model, "llama"), tp=2, cp=2, prompts=[[5]], max_new_tokens=1, world=world2)
    for dp_inputs in ("global", "local"):  # refused before any model is built
        with pytest.raises(ValueError, match=rf"1 prompt row\(s\) cannot be split over dp=2 replicas \(dp_inputs='{dp_inputs}'\)"):
            assert_equivalent(functools.partial(tiny_model, "llama"), tp=1, cp=1, dp=2, prompts=[[5]], max_new_tokens=1,
                              dp_inputs=dp_inputs, world=world2)


def test_snippet_for_a_config_and_tensors_is_runnable_source():
    import transformers

    from cpcompile.testing.strategies import tiny_model_from_config

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, head_dim=8, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    prompts = (torch.tensor([[0, 5], [6, 7]]), torch.tensor([[0, 1], [1, 1]]))
    snippet = reproduction(functools.partial(tiny_model_from_config, config, seed=2), tp=2, cp=1, dp=1, prompts=prompts,
                           max_new_tokens=3, dtype=torch.bfloat16, tolerance=None, parallel_options=dict(lowering="eager"))
    namespace = {}
    exec(compile(snippet.split("if __name__")[0], "<snippet>", "exec"), namespace)  # the imports resolve
    body = snippet.split('if __name__ == "__main__":')[1]
    factory = eval(body.split("assert_equivalent(")[1].split(",\n")[0].strip(), namespace)
    assert factory.func is tiny_model_from_config and factory.args[0].to_diff_dict() == config.to_diff_dict()
    assert "dtype=torch.bfloat16" in body and "torch.tensor([[0, 5], [6, 7]], dtype=torch.int64)" in body

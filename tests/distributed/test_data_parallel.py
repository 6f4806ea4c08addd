"""Attention data parallel and the FFN token layouts end to end (issue 5, DESIGN.md sections 1 and 3).

On persistent gloo worlds: parallelize(model, dp=, tp=, cp=, ffn=, dp_inputs=) then HF's
generate() equals the single-device model; the collectives each scheme inserts are counted per
layer in the decode graph; the FFN-token counter shows ceil(T/cp) under ffn='sp'; KV per rank
covers only the replica's rows.
"""

import copy

import pytest
import torch
from cpcompile._hf import output_cache

from cpcompile.testing import WorldError
from test_parallelize import MAX_LENGTH, _generate, _prompts, check_equivalent


def _replica_prompts(dp_rank):
    """Local mode: replica d's own requests, a different batch size and prompt width per replica."""
    return _prompts(2 + dp_rank, 7 - 2 * dp_rank, seed=10 + dp_rank), 7 - 2 * dp_rank


def run_dp(arch, dp, tp, cp, ffn, dp_inputs, batch, prompt_len, new_tokens, combine="all_to_all", lowering="eager"):
    """On every rank: the single-device reference on this rank's requests, then the parallel run."""
    import torch.distributed as dist

    from cpcompile import KVCache, parallelize
    from cpcompile.data_parallel import split_rows
    from cpcompile.sharding import weight_bytes
    from cpcompile.serving import bucket
    from cpcompile.tiny import tiny_model

    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    dp_rank = dist.get_rank() // (tp * cp)
    if dp_inputs == "local":
        (ids, mask), prompt_len = _replica_prompts(dp_rank)
        rows = ids.shape[0]
    else:
        ids, mask = _prompts(batch, prompt_len)
        rows = split_rows(batch, dp)[dp_rank]
    # rows the graph runs: this replica's bucket (global mode: the bucket of the largest share; local
    # requests under world_tp: of the largest replica's batch, so all replicas run the same shapes)
    if dp_inputs == "global":
        graph_rows = bucket(max(split_rows(batch, dp)), 16, "")
    elif ffn == "world_tp":
        graph_rows = bucket(max(_replica_prompts(d)[0][0].shape[0] for d in range(dp)), 16, "")
    else:
        graph_rows = bucket(rows, 16, "")
    want = _generate(ref, ids, mask, new_tokens)
    # verify=False: the comparison with the reference is the stronger check; the graph count is generate()'s alone
    parallelize(model, dp=dp, tp=tp, cp=cp, ffn=ffn, dp_inputs=dp_inputs, combine=combine, max_length=MAX_LENGTH, lowering=lowering,
                verify=False)
    got = _generate(model, ids, mask, new_tokens)
    reports = model._cpcompile.backend.reports
    layer = output_cache(got).layers[0]
    return dict(
        sequences=got.sequences, logits=torch.stack(got.logits),
        ref_sequences=want.sequences, ref_logits=torch.stack(want.logits),
        dp_rank=dp_rank, rows=rows, graph_rows=graph_rows, prompt_len=prompt_len, cache_rows=layer.batch_size,
        kv_bytes=output_cache(got).kv_bytes(),
        kv_single_rows=KVCache(model.config.num_hidden_layers, MAX_LENGTH).allocate(ref, graph_rows).kv_bytes(),
        kv_heads=(layer.num_heads, layer.global_heads),
        weight_fraction=weight_bytes(model) / weight_bytes(ref),
        graphs=len(reports), decode=reports[-1].counts, prefill=reports[0].counts,
        layers=model.config.num_hidden_layers,
    )


def expected_decode_collectives(layers, dp, tp, cp, ffn, dp_inputs):
    """Collectives one decode step's graph issues, by kind (DESIGN.md sections 2-3, all_to_all combine)."""
    per_layer = dict(all_reduce=0, all_to_all=0, all_gather=0, reduce_scatter=0)
    if cp > 1:
        per_layer["all_to_all"] += 1  # the CP combine
    if ffn == "sp" and cp > 1:
        per_layer["reduce_scatter"] += 1  # o_proj's sum over the replica, leaving this CP rank its token chunk
        per_layer["all_gather"] += 1  # tokens back before QKV
        per_layer["all_reduce"] += 2 * (tp > 1)  # o_proj's remaining sum over tp, FFN down over tp
    elif ffn == "world_tp" and dp > 1:
        per_layer["all_gather"] += 1  # every replica's tokens before the FFN
        per_layer["reduce_scatter"] += 1  # back to each replica after down
        per_layer["all_reduce"] += 2 * (tp * cp > 1)  # o_proj over the replica, down's rest over the replica
    else:
        per_layer["all_reduce"] += 2 * (tp * cp > 1)  # o_proj and FFN down over the replica
    total = {k: v * layers for k, v in per_layer.items()}
    total["all_gather"] += (ffn == "sp" and cp > 1)  # before the final norm's consumer, the LM head
    total["all_gather"] += (dp > 1 and dp_inputs == "global")  # the logits of every replica
    if tp * cp > 1:  # vocab-parallel embedding and LM head over the replica
        if ffn == "sp" and cp > 1:
            total["reduce_scatter"] += 1  # the embedding's sum, leaving this CP rank its token chunk
            total["all_reduce"] += tp > 1  # its remaining sum over tp
        else:
            total["all_reduce"] += 1  # the masked lookups' sum
        total["all_gather"] += 1  # the logits' vocab shards
    return total


CASES = [  # arch, dp, tp, cp, ffn, dp_inputs, global batch (ragged where B % dp != 0)
    ("llama", 2, 1, 1, "tp", "global", 3),
    ("qwen3", 2, 1, 1, "world_tp", "global", 5),
    ("mistral", 2, 1, 1, "tp", "local", None),
    ("gemma2", 2, 1, 1, "world_tp", "local", None),
    ("phi3", 2, 1, 2, "tp", "global", 3),
    ("gpt_neox", 2, 1, 2, "sp", "local", None),
    ("llama", 2, 2, 1, "world_tp", "global", 4),
    ("qwen3", 2, 2, 1, "tp", "local", None),
    ("mistral", 1, 2, 2, "sp", "global", 3),
    ("gemma2", 1, 2, 2, "sp", "global", 2),
    ("phi3", 1, 2, 2, "sp", "global", 3),
    ("gpt_neox", 1, 2, 2, "sp", "global", 3),
    ("llama", 1, 1, 2, "sp", "global", 3),
]


@pytest.mark.parametrize("arch, dp, tp, cp, ffn, dp_inputs, batch", CASES)
def test_generate_equals_single_device(request, arch, dp, tp, cp, ffn, dp_inputs, batch):
    world = request.getfixturevalue(f"world{dp * tp * cp}")
    new_tokens = 12
    results = world.run(run_dp, arch, dp, tp, cp, ffn, dp_inputs, batch, 7, new_tokens)
    if dp_inputs == "local":  # each replica against the reference on its own requests
        for d in range(dp):
            mine = [r for r in results if r["dp_rank"] == d]
            check_equivalent(mine, mine[0]["prompt_len"])
        assert len({r["rows"] for r in results}) == dp  # the replicas really had different batches
    else:
        check_equivalent(results, 7)  # every rank returns the whole batch, equal to the reference
    first = results[0]
    layers = first["layers"]
    assert first["graphs"] == 2  # prefill + decode, no recompilation
    want = expected_decode_collectives(layers, dp, tp, cp, ffn, dp_inputs)
    for r in results:
        assert r["decode"]["collectives"] == want
        # the FFN-token counter: decode tokens T = the rows this replica's graph runs (its batch bucket)
        t = r["graph_rows"]
        if ffn == "sp" and cp > 1:
            per_rank = -(-t // cp)  # ceil(T/cp): no CP rank repeats another's FFN work
            assert r["prefill"]["ffn_tokens"] == [-(-t * 16 // cp)] * layers  # one prefill chunk of 16 tokens
        elif ffn == "world_tp" and dp > 1:
            per_rank = dp * t  # all replicas' tokens (the same bucket everywhere)
        else:
            per_rank = t
        assert r["decode"]["ffn_tokens"] == [per_rank] * layers
        # KV per rank covers only this replica's rows, bucketed (and its tp/cp shard of them)
        assert r["cache_rows"] == r["graph_rows"]
        slots = -(-MAX_LENGTH // cp) if cp > 1 else MAX_LENGTH
        local_heads, global_heads = r["kv_heads"]
        assert r["kv_bytes"] == r["kv_single_rows"] * (slots + 1) * local_heads // ((MAX_LENGTH + 1) * global_heads)
        if dp * tp * cp > dp:
            assert r["weight_fraction"] < 1.0


@pytest.mark.parametrize("lowering, dp, cp, ffn", [("inductor", 2, 1, "world_tp"), ("aot_eager", 1, 2, "sp")])
def test_compiled_lowerings(world2, lowering, dp, cp, ffn):
    """The new collectives (reduce-scatter, padded gathers, row concatenation) through AOT/Inductor."""
    results = world2.run(run_dp, "llama", dp, 1, cp, ffn, "global", 3, 6, 8, "all_to_all", lowering)
    check_equivalent(results, 6)
    assert results[0]["graphs"] == 2
    assert results[0]["decode"]["collectives"] == expected_decode_collectives(results[0]["layers"], dp, 1, cp, ffn, "global")


def test_sp_chunks_padded_when_tokens_do_not_divide(world2):
    """3 rows run as a bucket of 4: T = 4 decode tokens over cp = 2, chunks of 2; the 5-token prompt is one
    16-token prefill chunk, T = 64 tokens, 32 per CP rank."""
    results = world2.run(run_dp, "qwen3", 1, 1, 2, "sp", "global", 3, 5, 6)
    check_equivalent(results, 5)
    assert [r["decode"]["ffn_tokens"][0] for r in results] == [2, 2]
    assert [r["prefill"]["ffn_tokens"][0] for r in results] == [32, 32]  # ceil(4 x 16 / 2)


def too_few_rows():
    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    model = parallelize(tiny_model("llama"), dp=2, max_length=16, lowering="eager")
    ids = torch.full((1, 4), 5)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_global_batch_smaller_than_dp_is_refused(world2):
    with pytest.raises(WorldError, match=r"a global batch of 1 row\(s\) cannot be split over dp=2 replicas"):
        world2.run(too_few_rows)


def disagreeing_settings():
    import torch.distributed as dist

    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    model = parallelize(tiny_model("llama"), dp=2, dp_inputs="local", ffn="world_tp", max_length=32, lowering="eager")
    ids = torch.full((1, 4), 5 + dist.get_rank())
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4 + dist.get_rank(), do_sample=False)


def test_replicas_disagreeing_about_settings_are_refused(world2):
    with pytest.raises(WorldError, match=r"disagree about generation settings \(max_new_tokens: rank 0 has 4, rank 1 has 5"):
        world2.run(disagreeing_settings)


def replica_with_mixed_inputs():
    import torch.distributed as dist

    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    model = parallelize(tiny_model("llama"), dp=2, cp=2, dp_inputs="local", max_length=16, lowering="eager")
    ids = torch.full((1, 4), 5 + dist.get_rank())  # ranks 0 and 1 are one replica and differ
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_local_mode_checks_inputs_within_a_replica(world4):
    with pytest.raises(WorldError, match="every rank of a replica"):
        world4.run(replica_with_mixed_inputs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dp=3, ffn="world_tp"), r"(?s)not divisible by 3 \(column/world\).*Valid \(tp, cp\) for this model with "
                                     r"combine='all_to_all', dp=3, ffn='world_tp': \[\]"),
        (dict(dp=2, tp=3, ffn="sp"), r"(?s)Hq=4 query heads are not divisible by tp=3.*dp=2, ffn='sp': \[\(1, 1\), \(1, 2\)"),
        (dict(ffn="ring"), r"ffn='ring'; expected one of \('tp', 'sp', 'world_tp'\)"),
        (dict(dp_inputs="each"), r"dp_inputs='each'; expected one of \('global', 'local'\)"),
        (dict(mla_uv="middle"), r"mla_uv='middle'; expected one of \('after', 'before'\)"),
    ],
)
def test_bad_settings_are_refused_before_any_rank_starts(kwargs, message):
    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    with pytest.raises(ValueError, match=message):
        parallelize(tiny_model("llama"), **kwargs)


def test_mla_and_moe_model_under_attention_dp(world2):
    """DeepSeek-V3 (MLA attention, MoE FFN) at dp=2: each replica's attention is tp = cp = 1."""
    results = world2.run(run_dp, "deepseek_v3", 2, 1, 1, "tp", "global", 3, 6, 8)
    check_equivalent(results, 6)
    assert [r["rows"] for r in results] == [2, 1] and [r["cache_rows"] for r in results] == [2, 2]  # one bucket of 2
    assert results[0]["decode"]["collectives"] == dict(all_reduce=0, all_to_all=0, all_gather=1, reduce_scatter=0)


def replicas_stopping_at_different_steps():
    """Local mode, ffn='world_tp': replica 0 meets EOS early, replica 1 does not; the finished
    replica keeps stepping (HF's synced_gpus) so the other's per-layer gathers still complete."""
    import torch.distributed as dist

    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    requests = [_prompts(1, 6, seed=20), _prompts(2, 4, seed=21)]  # replica 0: one row; replica 1: two
    eos = int(_generate(ref, *requests[0], 3).sequences[0, -1])  # replica 0 stops after 3 tokens
    ids, mask = requests[dist.get_rank()]
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, **kw)
        parallelize(model, dp=2, ffn="world_tp", dp_inputs="local", max_length=MAX_LENGTH, lowering="eager")
        got = model.generate(ids, attention_mask=mask, **kw)
    return got, want, eos


def test_local_replicas_may_finish_at_different_steps(world2):
    results = world2.run(replicas_stopping_at_different_steps)
    for got, want, eos in results:
        assert torch.equal(got, want)
    (got0, _, eos), (got1, _, _) = results
    assert got0.shape[1] - 6 == 3 and got1.shape[1] - 4 == 10  # replica 0 stopped early, replica 1 went on

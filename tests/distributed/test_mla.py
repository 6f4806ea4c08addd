"""MLA (DeepSeek-V3 with q_lora_rank set, DeepSeek-V2 without) under tp x cp x dp: absorbed attention
over the cached latent, its slots split over the replica's tp*cp ranks (Helix), equals the
single-device model (tokens and logits, every rank), with exact per-rank latent bytes and the
decode graph's collectives counted against the formula."""

import copy
import math

import pytest
import torch

import cpcompile
from cpcompile._hf import output_cache
from cpcompile.tiny import tiny_model
from tests.distributed.test_parallelize import _generate, _prompts, check_equivalent
from tests.test_explain import _decode_counts

MAX_LENGTH = 40


def run_mla(arch, options, batch, prompt_len, new_tokens, max_length=MAX_LENGTH, prefill_chunk=256):
    """On every rank: HF's generate, then the parallel one; returns what the parent checks."""
    from cpcompile import parallelize

    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    ids, mask = _prompts(batch, prompt_len)
    want = _generate(ref, ids, mask, new_tokens)
    parallelize(model, max_length=max_length, prefill_chunk=prefill_chunk, lowering="eager", verify=False, **options)
    got = _generate(model, ids, mask, new_tokens)
    reports = model._cpcompile.backend.reports
    cache = output_cache(got)
    return dict(
        sequences=got.sequences, logits=torch.stack(got.logits),
        ref_sequences=want.sequences, ref_logits=torch.stack(want.logits),
        kv_bytes=cache.kv_bytes(), kv_shape=tuple(cache.layers[0].keys.shape),
        absorbed=[r.counts["latent_absorbed"] for r in reports], expanded=[r.counts["latent_expanded"] for r in reports],
        decode_collectives=reports[-1].counts["collectives"], decode_bytes=reports[-1].counts["collective_bytes"],
    )


# tiny configs (cpcompile.tiny): 2 layers, H = 4 heads; latent R + rope Dr per token
LATENT = {"deepseek_v3": (16, 8), "deepseek_v2": (24, 8)}
V_HEAD = {"deepseek_v3": 12, "deepseek_v2": 16}
LAYERS, HEADS = 2, 4

CASES = [  # (arch, options, world)
    ("deepseek_v3", dict(cp=2), 2),
    ("deepseek_v2", dict(tp=2), 2),
    ("deepseek_v3", dict(tp=2, cp=2, kv_interleave=2), 4),
    ("deepseek_v3", dict(tp=2, cp=2, mla_uv="before"), 4),
    ("deepseek_v3", dict(cp=4, combine="ag_rs"), 4),
    ("deepseek_v3", dict(tp=4, combine="all_gather"), 4),
    ("deepseek_v2", dict(tp=2, cp=2, ffn="sp"), 4),
    ("deepseek_v3", dict(dp=2, cp=2), 4),
]


@pytest.mark.parametrize("arch, options, world", CASES, ids=[f"{a}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for a, o, _ in CASES])
def test_mla_parallel_equals_single_device(request, arch, options, world):
    batch, prompt, new = 2, 6, 8
    results = request.getfixturevalue(f"world{world}").run(run_mla, arch, options, batch, prompt, new)
    check_equivalent(results, prompt)
    tp, cp, dp = options.get("tp", 1), options.get("cp", 1), options.get("dp", 1)
    n = tp * cp  # the latent's slots are split over the replica
    r, dr = LATENT[arch]
    rows = 1 if dp > 1 else 2  # each replica's bucket of rows
    slots = math.ceil(MAX_LENGTH / (n * options.get("kv_interleave", 1))) * options.get("kv_interleave", 1) + 1  # + the sink
    for res in results:
        assert res["kv_shape"] == (rows, 1, slots, r + dr)  # one joint latent head, nothing expanded
        assert res["kv_bytes"] == LAYERS * rows * slots * (r + dr) * 4
        assert [a + e for a, e in zip(res["absorbed"], res["expanded"])] == [LAYERS, LAYERS]  # prefill chunk, decode
        assert res["absorbed"][-1] == LAYERS  # decode attends the latent (the prefill chunk: expands()'s choice)
    if options.get("ffn", "tp") != "tp":
        return
    c = results[0]["decode_collectives"]
    combine = options.get("combine", "all_to_all")
    a2a = LAYERS if combine == "all_to_all" and n > 1 else 0
    ag = 1 + (LAYERS if combine in ("ag_rs", "all_gather") and n > 1 else 0) + (dp > 1)  # LM head, combine, dp gather
    rs = LAYERS if combine == "ag_rs" and n > 1 else 0
    # per layer: o_proj's all-reduce + the FFN's (dense layer 0, MoE layer 1: one each); the embedding's once
    assert c == {"all_reduce": 2 * LAYERS + 1, "all_to_all": a2a, "all_gather": ag, "reduce_scatter": rs}
    report = cpcompile.explain(tiny_model(arch), **options)
    assert _decode_counts(report) == c  # explain's reading of the plan is what the passes compiled
    assert all(line.count("latent slots over the replica's tp*cp=") for line in str(report).splitlines() if "layout:" in line)
    if a2a:  # Helix's combine: B*H*(R + 1 lse) fp32 per layer per step (Dv + 1 with W_UV before it), whatever the context
        width = V_HEAD[arch] if options.get("mla_uv") == "before" else r
        assert results[0]["decode_bytes"]["all_to_all"] == LAYERS * rows * HEADS * (width + 1) * 4


def test_mla_long_prefill_chunk_expands_then_decode_absorbs(world4):
    """DeepSeek-V2 at tp2 x cp2 with a 36-token prompt in one chunk: the prefill graph takes the
    expanded form (fewer FLOPs at these dims, `absorb_latent.expands`), decode the absorbed one;
    both equal HF."""
    results = world4.run(run_mla, "deepseek_v2", dict(tp=2, cp=2), 1, 36, 4, 44, 64)
    check_equivalent(results, 36)
    assert results[0]["expanded"] == [LAYERS, 0] and results[0]["absorbed"] == [0, LAYERS]

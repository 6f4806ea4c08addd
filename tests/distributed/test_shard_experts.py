"""MoE experts sharded (passes/shard_experts.py) end to end on a gloo world, both placements.

Each case checks: greedy tokens equal the single-device model's and logits within fp32's
tolerance over a decode run; every rank's expert shards hold exactly their bytes (moe='tp':
1/n of every expert's intermediate dim; moe='ep': E/n whole experts); the decode graph's
collectives equal the formula below.
"""

import copy

import pytest
import torch

FP32_ATOL = 1e-4  # as tests/distributed/test_parallelize.py: logits O(10), the sum order differs


def run_moe(arch, moe, dp, tp, cp, ffn):
    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 250, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    full = {n: tuple(p.shape) for n, p in model.named_parameters() if ".experts." in n}
    with torch.no_grad():
        want = ref.generate(ids.masked_fill(mask == 0, 0), **kw)
        parallelize(model, dp=dp, tp=tp, cp=cp, ffn=ffn, moe=moe, max_length=32, lowering="eager", verify=False)
        got = model.generate(ids.masked_fill(mask == 0, 0), **kw)
    state = model._cpcompile
    local = {n: tuple(state.weights.local[n][0].shape) for n in full if n in state.weights.local}
    shared = sum(".shared_expert." in n for n in state.weights.local)
    return dict(sequences=got.sequences, logits=torch.stack(got.logits), ref_sequences=want.sequences,
                ref_logits=torch.stack(want.logits), full=full, local=local, shared=shared,
                collectives=state.backend.reports[-1].counts["collectives"], layers=model.config.num_hidden_layers)


CASES = [  # arch, moe, dp, tp, cp, ffn
    ("mixtral", "tp", 1, 2, 1, "tp"),
    ("mixtral", "ep", 1, 2, 2, "tp"),  # 4 experts over the replica's 4 ranks: one each
    ("mixtral", "ep", 1, 2, 2, "sp"),  # the MoE group is tp: 2 experts each; the block runs on gathered tokens
    ("qwen2_moe", "ep", 1, 2, 1, "tp"),  # shared expert + top-3 routing
    ("qwen2_moe", "tp", 2, 2, 1, "world_tp"),  # attention-DP: the experts stay on each replica's 2 ranks
]


@pytest.mark.parametrize("arch, moe, dp, tp, cp, ffn", CASES)
def test_moe_generate_equals_single_device(request, arch, moe, dp, tp, cp, ffn):
    world = request.getfixturevalue(f"world{dp * tp * cp}")
    results = world.run(run_moe, arch, moe, dp, tp, cp, ffn)
    n = tp if ffn == "sp" else tp * cp  # the MoE group: the FFN group (tp under 'sp'), the replica under 'world_tp'
    for r, res in enumerate(results):
        assert torch.equal(res["sequences"], res["ref_sequences"]), f"rank {r}"
        torch.testing.assert_close(res["logits"], res["ref_logits"], atol=FP32_ATOL, rtol=0)
        assert set(res["local"]) == set(res["full"])  # every expert weight sharded
        for name, (e, a, b) in res["full"].items():  # HF stores [E, 2I, H] (gate_up) and [E, H, I] (down)
            if moe == "ep":
                want = (e // n, a, b)
            else:
                want = (e, a // n, b) if name.endswith("gate_up_proj") else (e, a, b // n)
            assert res["local"][name] == want, name
        assert res["shared"] == (3 * res["layers"] if arch == "qwen2_moe" else 0)  # gate, up, down of the shared expert
    # per layer: o_proj's all-reduce and one after the routed combine (not one per top-k row), which also
    # sums the shared expert's partial output (its own all-reduce merged away); per forward: the
    # embedding's all-reduce, the LM head's all-gather (+ the logits of every replica under dp)
    layers = results[0]["layers"]
    per_layer = 2
    want = dict(all_reduce=per_layer * layers + 1, all_to_all=layers * (cp > 1), all_gather=1 + (dp > 1), reduce_scatter=0)
    if ffn == "sp":  # + per layer: the tokens before q/k/v and before the MoE block; o's reduce-scatter over cp.
        # Per forward: the embedding's reduce-scatter over cp, the last chunks before the LM head.
        want["all_gather"] += 2 * layers + 1
        want["reduce_scatter"] += layers + 1
    assert results[0]["collectives"] == want
    assert _explained(arch, moe, dp, tp, cp, ffn) == want  # explain's table agrees with the compiled graph


def _explained(arch, moe, dp, tp, cp, ffn) -> dict:
    import collections

    from cpcompile.explain import explain
    from cpcompile.tiny import tiny_model

    report = explain(tiny_model(arch), dp=dp, tp=tp, cp=cp, ffn=ffn, moe=moe)
    total = collections.Counter(c.kind for cs in report.layer_collectives().values() for c in cs)
    total.update(c.kind for c in report.forward_collectives())
    return {k: total[k] for k in ("all_reduce", "all_to_all", "all_gather", "reduce_scatter")}


def test_ep_refuses_experts_not_divisible():
    """moe='ep' with 4 experts over 3 ranks: a MeshError naming the numbers and the way out, before any rank is needed."""
    from cpcompile.passes import analyze  # noqa: F401  (the plan is what refuses)
    from cpcompile.explain import explain
    from cpcompile.tiny import tiny_model

    report = explain(tiny_model("mixtral"), tp=1, cp=3, moe="ep")
    assert not report.ok
    assert "4 experts not divisible by 3" in report.error and "use moe='tp'" in report.error

"""The fp64 references against textbook softmax on small hand-built cases."""

import math

import torch

from cpcompile.kernels.reference import attention_with_lse_ref, merge_states_ref

NEG_INF = float("-inf")


def test_single_query_textbook_softmax():
    # One head, one query at position 2, three slots at positions 0..2: plain softmax.
    q = torch.tensor([[[[1.0, 0.0]]]])  # [1, 1, 1, 2]
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]]])  # [1, 1, 3, 2]
    v = torch.tensor([[[[1.0], [2.0], [3.0]]]])  # [1, 1, 3, 1]
    o, lse = attention_with_lse_ref(q, k, v, torch.tensor([[2]]), torch.tensor([[0, 1, 2]]), scale=1.0)
    logits = [1.0, 0.0, 2.0]
    z = sum(math.exp(x) for x in logits)
    assert math.isclose(lse.item(), math.log(z), rel_tol=1e-12)
    assert math.isclose(o.item(), sum(math.exp(x) / z * y for x, y in zip(logits, [1, 2, 3])), rel_tol=1e-12)


def test_causal_window_empty_slot_and_softcap():
    # Query at position 3 sees slots with positions 1, 2 (window 3 drops 0; -1 is empty; 5 is future).
    q = torch.tensor([[[[2.0]]]])
    k = torch.tensor([[[[1.0], [1.0], [3.0], [5.0], [7.0]]]])
    v = torch.tensor([[[[10.0], [20.0], [30.0], [40.0], [50.0]]]])
    pos_kv = torch.tensor([[0, 1, 2, -1, 5]])
    o, lse = attention_with_lse_ref(q, k, v, torch.tensor([[3]]), pos_kv, scale=0.5, softcap=2.0, window=3)
    logits = [2.0 * math.tanh(0.5 * 2.0 * 1.0 / 2.0), 2.0 * math.tanh(0.5 * 2.0 * 3.0 / 2.0)]
    z = sum(math.exp(x) for x in logits)
    assert math.isclose(lse.item(), math.log(z), rel_tol=1e-12)
    assert math.isclose(o.item(), (math.exp(logits[0]) * 20 + math.exp(logits[1]) * 30) / z, rel_tol=1e-12)


def test_gqa_head_mapping_and_masks():
    # Hq=2, Hkv=1: both query heads read KV head 0. Bool mask hides slot 0; additive adds 1.0 to slot 1.
    q = torch.tensor([[[[1.0]], [[-1.0]]]])  # [1, 2, 1, 1]
    k = torch.tensor([[[[1.0], [2.0]]]])  # [1, 1, 2, 1]
    v = torch.tensor([[[[1.0], [5.0]]]])
    pq, pk = torch.tensor([[9]]), torch.tensor([[0, 1]])
    o, lse = attention_with_lse_ref(q, k, v, pq, pk, 1.0, mask=torch.tensor([[[False, True]]]))
    assert torch.equal(o.flatten(), torch.tensor([5.0, 5.0], dtype=torch.float64))
    assert torch.allclose(lse.flatten(), torch.tensor([2.0, -2.0], dtype=torch.float64))
    o, lse = attention_with_lse_ref(q, k, v, pq, pk, 1.0, mask=torch.tensor([[[0.0, 1.0]]]))
    for h, sign in enumerate([1.0, -1.0]):
        logits = [sign * 1.0, sign * 2.0 + 1.0]
        z = sum(math.exp(x) for x in logits)
        assert math.isclose(lse[0, h, 0].item(), math.log(z), rel_tol=1e-12)
        assert math.isclose(o[0, h, 0, 0].item(), (math.exp(logits[0]) + 5 * math.exp(logits[1])) / z, rel_tol=1e-12)


def test_no_visible_slot_and_empty_cache():
    q, k, v = torch.ones(1, 1, 1, 2), torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 3)
    o, lse = attention_with_lse_ref(q, k, v, torch.tensor([[0]]), torch.tensor([[-1, 4]]), 1.0)
    assert lse.item() == NEG_INF and torch.equal(o, torch.zeros(1, 1, 1, 3, dtype=torch.float64))
    o, lse = attention_with_lse_ref(q, k[:, :, :0], v[:, :, :0], torch.tensor([[0]]), torch.zeros(1, 0, dtype=torch.long), 1.0)
    assert lse.item() == NEG_INF and torch.equal(o, torch.zeros(1, 1, 1, 3, dtype=torch.float64))


def test_merge_textbook():
    # Two partials over disjoint slot sets {a} and {b, c} merge to softmax over {a, b, c}.
    la, lbc = 1.0, math.log(math.exp(2.0) + math.exp(0.5))
    oa, obc = 3.0, (math.exp(2.0) * 4.0 + math.exp(0.5) * 5.0) / math.exp(lbc)
    o = torch.tensor([oa, obc], dtype=torch.float64).reshape(2, 1, 1, 1, 1)
    lse = torch.tensor([la, lbc], dtype=torch.float64).reshape(2, 1, 1, 1)
    om, lm = merge_states_ref(o, lse)
    z = math.exp(1.0) + math.exp(2.0) + math.exp(0.5)
    assert math.isclose(lm.item(), math.log(z), rel_tol=1e-12)
    assert math.isclose(om.item(), (math.exp(1.0) * 3 + math.exp(2.0) * 4 + math.exp(0.5) * 5) / z, rel_tol=1e-12)


def test_merge_ignores_empty_partials():
    o = torch.tensor([7.0, 2.0, 9.0]).reshape(3, 1, 1, 1, 1)
    om, lm = merge_states_ref(o, torch.tensor([NEG_INF, 0.25, NEG_INF]).reshape(3, 1, 1, 1))
    assert om.item() == 2.0 and lm.item() == 0.25
    om, lm = merge_states_ref(o, torch.full((3, 1, 1, 1), NEG_INF))
    assert om.item() == 0.0 and lm.item() == NEG_INF

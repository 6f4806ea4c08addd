"""The attention rewrite: op counts before/after, and equality with the unrewritten graph."""

import copy

import pytest
import torch
from cpcompile._hf import cache_arg
import torch.nn.functional as F

from cpcompile.backend import Backend
from cpcompile.cache import KVCache
from cpcompile.passes import run_passes
from cpcompile.options import Options
from cpcompile.passes._fx import op_count
from cpcompile.tiny import ARCHITECTURES, tiny_model
from transformers import DynamicCache

from tests.passes._graphs import hf_graph

FP32_ATOL = 1e-5  # fp32 logits of the tiny models are O(10); summation order differs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_op_counts(arch):
    _, gm = hf_graph(arch)
    eager_softmax = arch == "gemma2"
    before = dict(sdpa=op_count(gm, "sdpa"), reads=op_count(gm, "kv_cache_read"), softmax=op_count(gm, "softmax"))
    assert before == dict(sdpa=0 if eager_softmax else 2, reads=2, softmax=2 if eager_softmax else 0)
    report = run_passes(gm, Options(lowering="eager"))
    assert report.counts["attention_rewritten"] == 2
    assert op_count(gm, "sdpa") == 0 and op_count(gm, "kv_cache_read") == 0 and op_count(gm, "softmax") == 0
    assert sum(n.target is torch.ops.cpcompile.attention_with_lse.default for n in gm.graph.nodes) == 2
    for n in gm.graph.nodes:  # meta stays right on what the pass inserted
        if n.op == "call_function" and n.target is torch.ops.cpcompile.attention_with_lse.default:
            assert n.meta["val"][1].dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("lowering", ["eager", "aot_eager"])
def test_prefill_and_decode_match_hf(arch, lowering):
    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    backend = Backend({"lowering": lowering})
    cache = KVCache(model.config.num_hidden_layers, 24).allocate(model, 2)
    fwd = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (2, 6), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :2] = 0  # left padding in row 0
    ref_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        got = fwd(input_ids=ids, attention_mask=mask, **{cache_arg(model): cache}, use_cache=True).logits
        want = ref(input_ids=ids, attention_mask=mask[:, :6], **{cache_arg(model): ref_cache}, use_cache=True).logits
        torch.testing.assert_close(got[1], want[1], atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(got[0, 2:], want[0, 2:], atol=FP32_ATOL, rtol=0)  # pad rows are don't-care
        for step in range(3):
            nxt = torch.randint(3, 250, (2, 1), generator=g)
            got = fwd(input_ids=nxt, attention_mask=mask, **{cache_arg(model): cache}, use_cache=True).logits
            want = ref(input_ids=nxt, attention_mask=mask[:, : 7 + step], **{cache_arg(model): ref_cache}, use_cache=True).logits
            torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)
    assert len(backend.reports) == 2  # prefill graph + one decode graph for all decode steps


class _Toy(torch.nn.Module):
    """SDPA without a cache (K/V computed in the graph) and an eager softcapped attention."""

    def __init__(self, eager: bool):
        super().__init__()
        self.eager = eager
        self.qkv = torch.nn.Linear(32, 3 * 32)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        if not self.eager:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        w = torch.matmul(q, k.transpose(2, 3)) * 0.3
        w = torch.tanh(w / 5.0) * 5.0
        w = w + torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        w = torch.softmax(w, dim=-1, dtype=torch.float32)
        return torch.matmul(w, v)


@pytest.mark.parametrize("eager", [False, True])
def test_no_cache_attention_is_rewritten_exactly(eager):
    torch.manual_seed(0)
    toy = _Toy(eager)
    x = torch.randn(2, 7, 32)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7).clone()
    mask[1, :, :, :3] = False  # padding in row 1
    mask[1, :, :3, 0] = True  # keep pad query rows non-empty for SDPA's sake
    backend = Backend({"lowering": "eager"})
    got = torch.compile(toy, backend=backend, fullgraph=True)(x, mask)
    want = toy(x, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    counts = backend.reports[0].counts
    assert counts["attention_rewritten"] == 1 and counts["attention_with_lse"] == 1 and counts["sdpa_after"] == 0


def test_debug_switch_dumps_each_graph_before_and_after_each_pass(tmp_path):
    toy = _Toy(eager=False)
    x = torch.randn(1, 4, 32)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    torch.compile(toy, backend="cpcompile", options={"lowering": "eager", "debug_dir": str(tmp_path)})(x, mask)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].endswith("-0-input.py") and names[1].endswith("-1-rewrite_attention.py")
    before, after = (tmp_path / n for n in names)
    assert "scaled_dot_product_attention" in before.read_text()
    assert "attention_with_lse" in after.read_text() and "scaled_dot_product_attention" not in after.read_text()

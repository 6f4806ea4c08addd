import pytest
import torch
import torch.nn.functional as F

from cpcompile.passes.find_attention import AttentionError, find_attention_sites
from cpcompile.tiny import ARCHITECTURES

from tests.passes._graphs import capture_graph, hf_graph

EXPECTED = {  # arch: (form, Hq, Hkv, Dk, Dv, softcap)
    "llama": ("sdpa", 4, 2, 16, 16, 0.0),
    "qwen2": ("sdpa", 4, 2, 16, 16, 0.0),
    "qwen3": ("sdpa", 4, 2, 16, 16, 0.0),
    "mistral": ("sdpa", 4, 2, 16, 16, 0.0),
    "gemma2": ("eager", 4, 2, 16, 16, 50.0),
    "phi3": ("sdpa", 4, 2, 16, 16, 0.0),
    "gpt_neox": ("sdpa", 4, 4, 16, 16, 0.0),
    "deepseek_v3": ("sdpa", 4, 4, 24, 12, 0.0),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_sites(arch):
    _, gm = hf_graph(arch)
    sites = find_attention_sites(gm)
    assert len(sites) == 2  # one per decoder layer
    form, hq, hkv, dk, dv, softcap = EXPECTED[arch]
    for i, s in enumerate(sites):
        d = s.dims
        assert (s.index, s.form, d["Hq"], d["Hkv"], d["Dk"], d["Dv"], s.softcap) == (i, form, hq, hkv, dk, dv, softcap)
        assert d["Lq"] == 5 and d["S"] == 16  # 5 prompt tokens over the 16-slot cache
        assert s.cache_read is not None
        assert s.mask is not None


_CAUSAL = torch.full((6, 6), float("-inf")).triu(1)[None, None]  # additive causal mask over 6 tokens


class _Attn(torch.nn.Module):
    def __init__(self, mode, heads=4, kv_heads=2, dim=8):
        super().__init__()
        self.mode, self.h, self.hkv, self.d = mode, heads, kv_heads, dim
        self.q = torch.nn.Linear(32, heads * dim)
        self.kv = torch.nn.Linear(32, 2 * kv_heads * dim)

    def forward(self, x, mask=None):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2 * self.hkv, self.d).transpose(1, 2).chunk(2, dim=1)
        if self.mode == "gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        k = k.repeat_interleave(self.h // self.hkv, dim=1)
        v = v.repeat_interleave(self.h // self.hkv, dim=1)
        if self.mode == "encoder":
            return F.scaled_dot_product_attention(q, k, v)
        if self.mode == "dropout":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
        if self.mode == "alibi":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.mode in ("eager", "sink_lse"):
            s = q @ k.transpose(2, 3) * self.d**-0.5 + mask
            o = torch.softmax(s, dim=-1) @ v
            if self.mode == "sink_lse":  # Granite-SWA: a sink as sigmoid(logsumexp(scores) - sink) on the output
                o = o * torch.sigmoid(torch.logsumexp(s, dim=-1) - 1.5)[..., None]
            return o
        raise AssertionError(self.mode)


def test_sdpa_enable_gqa_found():
    gm = capture_graph(_Attn("gqa"), torch.randn(2, 6, 32))
    (site,) = find_attention_sites(gm)
    assert site.is_causal and site.mask is None and site.cache_read is None
    assert (site.dims["Hq"], site.dims["Hkv"]) == (4, 2)
    assert site.scale == pytest.approx(8**-0.5)


@pytest.mark.parametrize(
    "mode, args, message",
    [
        ("encoder", (), "bidirectional"),
        ("dropout", (), "dropout_p=0.1"),
        ("alibi", (torch.randn(2, 4, 6, 6),), "ALiBi"),
        ("sink_lse", (_CAUSAL,), r"scores \(q @ k\^T before the softmax\) are also used outside the softmax, by logsumexp at "
                         r"test_find_attention.py:\d+ in forward"),
    ],
)
def test_unrewritable_attention_is_an_error(mode, args, message):
    gm = capture_graph(_Attn(mode), torch.randn(2, 6, 32), *args)
    with pytest.raises(AttentionError, match=message):
        find_attention_sites(gm)


def test_eager_attention_found_when_its_scores_are_private():
    gm = capture_graph(_Attn("eager"), torch.randn(2, 6, 32), _CAUSAL)
    (site,) = find_attention_sites(gm)
    assert site.form == "eager" and site.scale == pytest.approx(8**-0.5)


def test_non_attention_softmax_is_not_a_site():
    def router(x, w):
        return torch.softmax(x @ w, dim=-1) @ w.t()  # softmax followed by matmul, but no q @ k^T before it

    gm = capture_graph(router, torch.randn(3, 8), torch.randn(8, 4))
    assert find_attention_sites(gm) == []

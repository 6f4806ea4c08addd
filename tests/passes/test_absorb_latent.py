"""absorb_latent: MLA's K/V expansion found by probing, and the absorbed rewrite's graph."""

import pytest
import torch

from cpcompile.options import Options
from cpcompile.passes import analyze, count_collectives, run_passes
from cpcompile.passes._fx import op_count, shape
from cpcompile.passes.absorb_latent import LatentKV, expands, find_latent
from cpcompile.passes.find_attention import AttentionError, find_attention_sites
from tests.passes._graphs import hf_graph, weight_names


@pytest.mark.parametrize("arch, dims", [
    # (H, P = Dn + Dv, k_nope cols, v cols, R, Dr): the tiny configs of cpcompile.tiny
    ("deepseek_v3", (4, 28, (0, 16), (16, 28), 16, 8)),
    ("deepseek_v2", (4, 28, (0, 12), (12, 28), 24, 8)),
])
def test_find_latent_reads_the_expansion_by_probing(arch, dims):
    model, gm = hf_graph(arch)
    sites = find_attention_sites(gm)
    lats = [find_latent(s) for s in sites]
    h, p, k_cols, v_cols, r, dr = dims
    dn = k_cols[1] - k_cols[0]
    for lat in lats:
        assert (lat.heads, lat.per_head, lat.k_cols, lat.v_cols, lat.rank, lat.rope) == (h, p, k_cols, v_cols, r, dr)
        assert lat.q_nope == tuple(range(dn)) and lat.q_rope == tuple(range(dn, dn + dr))  # query = [q_pass, q_rot]
        assert shape(lat.weight) == (h * p, r)  # kv_b_proj's weight, viewed [H, P, R] in the rewrite


def test_ordinary_attention_has_no_latent():
    _, gm = hf_graph("llama")
    assert all(find_latent(s) is None for s in find_attention_sites(gm))


def test_absorbed_graph_attends_the_latent_once_per_layer():
    """After the rewrite: no up-projection of the cache (the 'kv_b_proj over every slot' is gone), the
    kernel reads one KV head of R + Dr = 24 values with Dv = R = 16, and W_UK / W_UV are views of the
    weight (two matmuls per layer), not copies."""
    model, gm = hf_graph("deepseek_v3", prompt=1)  # a decode step
    report = run_passes(gm, Options(lowering="eager"), names=weight_names(model, gm))
    assert report.counts["attention_rewritten"] == 2 and report.counts["cache_reads_after"] == 0
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.cpcompile.attention_with_lse.default]
    for n in calls:
        q, k, v = (shape(a) for a in n.args[:3])
        assert q == (2, 4, 1, 24) and k == (2, 1, 16, 24) and v == (2, 1, 16, 16)
    linears = [n for n in gm.graph.nodes if n.target is torch._C._nn.linear]
    assert not any(shape(n)[-2] == 16 and shape(n)[-1] == 4 * 28 for n in linears)  # no [.., S, H*P] expansion
    assert sum(n.target is torch.matmul for n in gm.graph.nodes) == 4  # W_UK and W_UV, 2 layers
    assert op_count(gm, "sdpa") == 0 and not any(n.op == "call_method" and n.target == "copy_" for n in gm.graph.nodes)
    assert count_collectives(gm) == {"all_reduce": 0, "all_to_all": 0, "all_gather": 0, "reduce_scatter": 0}


def test_prefill_expands_when_the_flops_say_so():
    """The rule, at DeepSeek-V3's dims over a 32k cache: decode and short chunks absorb, long chunks expand."""
    lat = LatentKV(None, heads=128, per_head=256, k_cols=(0, 128), v_cols=(128, 256), q_nope=(), q_rope=(), rank=512, rope=64)
    assert not expands(lat, 1, 32768) and not expands(lat, 128, 32768)
    assert expands(lat, 256, 32768) and expands(lat, 4096, 32768)
    # the crossover: 2^32 / (H*(2*Dn*R + S*(2R+Dr) ... )) = 169.8 query tokens at S = 32768
    assert not expands(lat, 169, 32768) and expands(lat, 170, 32768)


def test_expanded_prefill_graph_runs_the_up_projection_on_the_local_slots():
    """A long prefill chunk at the tiny dims takes the expanded path: one linear over the slots per
    layer, per-head K of Dn + Dr = 24 and V of Dv = 12."""
    model, gm = hf_graph("deepseek_v3", batch=1, prompt=40, max_length=48)
    sites = analyze(gm, Options(), weight_names(model, gm)).sites
    assert all(expands(s.latent, 40, 48) for s in sites)
    run_passes(gm, Options(lowering="eager"), names=weight_names(model, gm))
    for n in (n for n in gm.graph.nodes if n.target is torch.ops.cpcompile.attention_with_lse.default):
        assert shape(n.args[1]) == (1, 4, 48, 24) and shape(n.args[2]) == (1, 4, 48, 12)


def test_a_bias_on_the_latent_up_projection_is_refused():
    model, gm = hf_graph("deepseek_v3")
    site = find_attention_sites(gm)[0]
    up = find_latent(site).up
    bias = gm.graph.placeholder("bias")  # any node: the pass must refuse what it cannot absorb exactly
    up.args = (*up.args[:2], bias)
    with pytest.raises(AttentionError, match="adds a bias"):
        find_latent(site)


def test_later_graphs_reuse_the_structure_instead_of_probing(monkeypatch):
    """The probe evaluates the expansion at the graph's own size (float64): fine on parallelize's capture,
    far too big on a serving graph of a real model. A graph given the structure read earlier is only
    checked against it; without it, a graph past the size limit is refused, naming what to do."""
    import cpcompile.passes.absorb_latent as absorb

    _, small = hf_graph("deepseek_v3", batch=1, max_length=16)
    known = {s.index: s.latent for s in find_attention_sites(small)}
    _, big = hf_graph("deepseek_v3", batch=2, max_length=24)
    monkeypatch.setattr(absorb, "PROBE_BYTES", 0)  # any probe now refuses
    sites = find_attention_sites(big, known)
    assert [s.latent.up.graph for s in sites] == [big.graph, big.graph]  # this graph's own up-projection nodes
    assert [s.latent.k_cols for s in sites] == [known[0].k_cols, known[1].k_cols]
    with pytest.raises(AttentionError, match=r"(?s)reading this MLA layer's structure.*cpcompile.parallelize reads it once"):
        find_attention_sites(big)


def test_an_up_projected_cache_not_read_as_mla_is_refused_at_tp_cp_above_one():
    """kv_up and mla_q are replicated: a layer whose expansion absorb_latent could not read would get
    per-head K/V for every head beside TP-sliced queries. The plan refuses such a layer's sharding."""
    from cpcompile.passes.plan import Mesh, plan_problems

    model, gm = hf_graph("deepseek_v3")
    analysis = analyze(gm, Options(), weight_names(model, gm))
    assert not plan_problems(analysis.roles, analysis.sites, Mesh(tp=2))
    analysis.sites[1].latent = None
    (problem,) = plan_problems(analysis.roles, analysis.sites, Mesh(tp=2))
    assert problem.startswith("layer 1: its K/V are up-projected") and not plan_problems(analysis.roles, analysis.sites, Mesh())

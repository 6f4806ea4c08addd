import pytest

from cpcompile.passes.find_attention import find_attention_sites
from cpcompile.passes.find_projections import find_projections

from tests.passes._graphs import hf_graph, weight_names

# Roles per layer, in graph order; read off the dataflow, never the names (the names
# below are only how the test checks the answer).
EXPECTED = {
    "llama": {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
    "qwen3": {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
    "gemma2": {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
    "phi3": {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"},
    "gpt_neox": {"query_key_value": "qkv", "attention.dense": "o", "dense_h_to_4h": "fc1", "dense_4h_to_h": "fc2"},
    "deepseek_v3": {"q_a_proj": "q_down", "q_b_proj": "mla_q", "kv_a_proj_with_mqa": "kv_down", "kv_b_proj": "kv_up", "o_proj": "o"},
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_roles_by_dataflow(arch):
    model, gm = hf_graph(arch)
    roles = find_projections(gm, find_attention_sites(gm), weight_names(model, gm))
    params = dict(model.named_parameters())
    for p in roles.projections:
        assert p.weight in params, p.weight  # names map back to real parameters
        want = (p.out_features, p.in_features) if not p.transposed else (p.in_features, p.out_features)
        assert params[p.weight].shape == ((p.experts,) + want if p.experts else want)  # experts: [E, out, in]
    for layer in (0, 1):
        got = {p.weight: p.role for p in roles.by_layer(layer)}
        for fragment, role in EXPECTED[arch].items():
            (name,) = [w for w in got if fragment in w]
            assert got[name] == role, (name, got)
    (head,) = [p for p in roles.projections if p.role == "lm_head"]
    assert head.weight == "lm_head.weight" and head.layer == -1


def test_deepseek_moe_layer_roles():
    """DeepSeek-V3's MoE layer: the router (sigmoid scores, group-limited top-k with a bias), the
    routed experts (3-D grouped matmuls) and the shared experts, each by dataflow; layer 0 is dense."""
    model, gm = hf_graph("deepseek_v3")
    roles = find_projections(gm, find_attention_sites(gm), weight_names(model, gm))
    moe = {p.weight.split(".mlp.")[1]: p.role for p in roles.by_layer(1) if ".mlp." in p.weight}
    assert moe == {
        "gate.weight": "router",
        "shared_experts.gate_proj.weight": "shared_gate",
        "shared_experts.up_proj.weight": "shared_up",
        "shared_experts.down_proj.weight": "shared_down",
        "experts.gate_up_proj": "expert_up",
        "experts.down_proj": "expert_down",
    }
    (up,) = [p for p in roles.by_layer(1) if p.role == "expert_up"]
    assert (up.experts, up.out_features, up.in_features, up.transposed) == (4, 2 * 32, 64, False)  # [E, 2I, H] stored [E, out, in]
    dense = {p.role for p in roles.by_layer(0)}
    assert {"gate", "up", "down"} <= dense


def test_names_by_identity_not_by_dynamo_source():
    """Dynamo's source names change when transformers wraps a forward (5.24: `args.0.model...`);
    names come from the tensor objects, so a wrapper around the forward changes nothing."""
    import functools

    import torch

    from cpcompile._hf import cache_arg
    from cpcompile.cache import KVCache
    from cpcompile.tiny import tiny_model
    from tests.passes._graphs import capture_graph

    model = tiny_model("llama")

    @functools.wraps(model.forward)
    def wrapped(*args, **kwargs):  # the shape of HF's @deprecate_kwarg wrapper
        return model.forward(*args, **kwargs)

    cache = KVCache(model.config.num_hidden_layers, 16).allocate(model, 1)
    ids = torch.ones(1, 3, dtype=torch.long)
    gm = capture_graph(wrapped, ids, attention_mask=torch.ones(1, 16, dtype=torch.long), **{cache_arg(model): cache}, use_cache=True)
    roles = find_projections(gm, find_attention_sites(gm), weight_names(model, gm))
    params = dict(model.named_parameters())
    assert len(roles.projections) == 16  # 2 layers x 7 linears, the LM head and the embedding lookup
    assert all(p.weight in params for p in roles.projections)
    assert all(p.node.meta["cpcompile_weight"] == p.weight for p in roles.projections)
    assert {p.weight for p in roles.projections if p.role == "o"} == {f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)}


def test_a_weight_shared_by_two_layers_gets_no_layer_role():
    """Sharding a weight for one of its uses would break the others: a q_proj shared by both
    layers is `shared` (replicated), and the plan then refuses tp > 1 for the layers without q."""
    import torch

    from cpcompile._hf import cache_arg
    from cpcompile.cache import KVCache
    from cpcompile.options import Options
    from cpcompile.passes import analyze
    from cpcompile.passes.plan import MeshError
    from cpcompile.tiny import tiny_model
    from tests.passes._graphs import capture_graph

    model = tiny_model("llama")
    model.model.layers[1].self_attn.q_proj = model.model.layers[0].self_attn.q_proj
    ids = torch.ones(1, 4, dtype=torch.long)
    gm = capture_graph(model.forward, input_ids=ids, attention_mask=torch.ones(1, 16, dtype=torch.long),
                       **{cache_arg(model): KVCache(2, 16).allocate(model, 1)}, use_cache=True)
    analysis = analyze(gm, Options(), weight_names(model, gm))
    shared = [(p.role, p.layer) for p in analysis.roles.projections if p.weight == "model.layers.0.self_attn.q_proj.weight"]
    assert shared == [("shared", -1), ("shared", -1)]
    assert any("(shared): the weight is used in more than one place" in n for n in analysis.notes)
    with pytest.raises(MeshError, match=r"layer 0: no q projection found"):
        analyze(gm, Options(tp=2), weight_names(model, gm))

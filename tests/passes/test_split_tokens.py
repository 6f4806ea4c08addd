"""split_tokens and gather_replicas on captured graphs, without a process group: what they insert,
the shapes the token-wise region takes, and the refusals (exactness is tests/distributed's job)."""

import pytest
import torch

from cpcompile.distributed import RankContext
from cpcompile.options import Options
from cpcompile.passes import analyze, count_collectives, ffn_tokens
from cpcompile.passes._fx import is_op, shape
from cpcompile.passes.gather_replicas import gather_replicas
from cpcompile.passes.rewrite_attention import rewrite_attention
from cpcompile.passes.local_layouts import keep_local
from cpcompile.passes.shard_linears import shard_linears
from cpcompile.passes.shard_weights import RankWeights, local_tensors, shard_weights
from cpcompile.passes.split_tokens import TokenSplitError, split_tokens
from cpcompile.data_parallel import REPLICA_LAYOUT
from tests.passes._graphs import hf_graph, weight_names

NAMES = {g: f"group_{g}" for g in ("cp", "tp", "replica", "dp", "world")}


def _rewritten(model, gm, dp, tp, cp, ffn, rank=0):
    """Run passes 1-5 as `run_passes` does for this rank; returns the analysis."""
    options = Options(tp=tp, cp=cp, dp=dp, ffn=ffn)
    analysis = analyze(gm, options, weight_names(model, gm))
    ctx = RankContext.of(options, rank, NAMES)
    shards = shard_weights(analysis, ctx)
    params = dict(model.named_parameters())
    local = {n: local_tensors(s, params[n].detach(), params.get(n[:-6] + "bias")) for n, s in shards.items()}
    rewrite_attention(gm, analysis.sites, ctx)
    shard_linears(gm, RankWeights(shards, local), ctx)
    keep_local(gm)
    return analysis, ctx


def test_sp_chunks_the_residual_stream():
    model, gm = hf_graph("llama", batch=3, prompt=5)  # T = 15 tokens, cp = 2: chunks of 8
    analysis, ctx = _rewritten(model, gm, 1, 1, 2, "sp", rank=1)
    counts = split_tokens(gm, analysis.placements, ctx)
    layers = model.config.num_hidden_layers
    assert counts == {"all_gather": layers + 1, "reduce_scatter": layers, "all_reduce": 0, "slices": 1}
    assert ffn_tokens(gm, analysis) == [8] * layers
    rs = [n for n in gm.graph.nodes if n.target is torch.ops._c10d_functional.reduce_scatter_tensor.default]
    assert [shape(n.args[0]) for n in rs] == [(16, 64)] * layers  # 15 tokens padded to 2 x 8
    assert all(n.args[3] == "group_cp" for n in rs)
    for n in gm.graph.nodes:  # every q/k/v projection reads all 15 tokens; every FFN linear its 8
        if is_op(n, "linear") and n.meta.get("cpcompile_weight", "").endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            assert shape(n.args[0])[:2] == (1, 8)
        if is_op(n, "linear") and "q_proj" in str(n.args[1]):
            assert shape(n.args[0])[:2] == (3, 5)
    assert count_collectives(gm)["all_to_all"] == layers  # the CP combine is untouched


def test_sp_tp2_sums_o_over_tp_after_the_reduce_scatter():
    model, gm = hf_graph("qwen3", batch=2, prompt=3)
    analysis, ctx = _rewritten(model, gm, 1, 2, 2, "sp", rank=3)
    counts = split_tokens(gm, analysis.placements, ctx)
    layers = model.config.num_hidden_layers
    assert counts["reduce_scatter"] == layers and counts["all_reduce"] == layers  # o's rest over tp
    reduces = [n.args[2] for n in gm.graph.nodes if n.target is torch.ops._c10d_functional.all_reduce.default]
    assert reduces == ["group_tp"] * 2 * layers  # o's rest and FFN down, both over the tp group only
    assert ffn_tokens(gm, analysis) == [3] * layers


def test_world_tp_gathers_every_replicas_tokens_around_the_ffn():
    model, gm = hf_graph("gpt_neox", batch=2, prompt=3)  # this replica: 6 tokens; the other: 4
    analysis, ctx = _rewritten(model, gm, 2, 1, 1, "world_tp", rank=0)
    counts = split_tokens(gm, analysis.placements, ctx, tokens=[6, 4])
    layers = model.config.num_hidden_layers
    assert counts == {"all_gather": layers, "reduce_scatter": layers, "all_reduce": 0, "slices": 0}
    assert ffn_tokens(gm, analysis) == [12] * layers  # 2 replicas x 6 (the largest)
    gathers = [n for n in gm.graph.nodes if n.target is torch.ops._c10d_functional.all_gather_into_tensor.default]
    assert [shape(n.args[0]) for n in gathers] == [(6, 64)] * layers and all(n.args[2] == "group_dp" for n in gathers)


def test_world_tp_refuses_a_token_mixing_op_inside_the_ffn(monkeypatch):
    from transformers.models.llama import modeling_llama

    def mixing_mlp(self, x):  # a running sum over the sequence inside the FFN: not token-wise
        return self.down_proj((self.act_fn(self.gate_proj(x)) * self.up_proj(x)).cumsum(1))

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", mixing_mlp)
    model, gm = hf_graph("llama", batch=2, prompt=3)
    analysis, ctx = _rewritten(model, gm, 2, 1, 1, "world_tp", rank=1)
    with pytest.raises(TokenSplitError, match=r"ffn='world_tp': .*cumsum.* not a token-wise op"):
        split_tokens(gm, analysis.placements, ctx, tokens=[6, 6])


def test_sp_gathers_before_a_token_mixing_op(monkeypatch):
    """Under sp the same op gets all tokens back first: correct, at the cost of one more all-gather."""
    from transformers.models.llama import modeling_llama

    def mixing_mlp(self, x):
        return self.down_proj((self.act_fn(self.gate_proj(x)) * self.up_proj(x)).cumsum(1))

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", mixing_mlp)
    model, gm = hf_graph("llama", batch=2, prompt=3)
    analysis, ctx = _rewritten(model, gm, 1, 1, 2, "sp", rank=0)
    counts = split_tokens(gm, analysis.placements, ctx)
    layers = model.config.num_hidden_layers
    assert counts["all_gather"] == 2 * layers + 1
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.target == "cumsum":
            assert shape(n) == (2, 3, 128)  # all 6 tokens, in [B, L, I]


def test_gather_replicas_takes_the_real_rows_back_in_order():
    model, gm = hf_graph("llama", batch=1, prompt=3)
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and "input_ids" in n.name)
    with gm.graph.inserting_after(ids):
        from cpcompile.passes._fx import insert_call

        marker = insert_call(gm.graph, REPLICA_LAYOUT, (ids, [2, 1], [6, 3]))
    for u in list(ids.users):
        if u is not marker:
            u.replace_input_with(ids, marker)
    counts = gather_replicas(gm, RankContext(dp=2, rank=1, group_names={"dp": "group_dp"}), gather_outputs=True)
    assert counts == {"all_gather": 1}
    assert not any(n.target is REPLICA_LAYOUT for n in gm.graph.nodes)
    (logits,) = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert shape(logits)[0] == 3  # rows 0-1 of replica 0, row 0 of replica 1 (padded to 2 for the gather)
    cat = logits
    assert cat.target is torch.cat and [shape(p)[0] for p in cat.args[0]] == [2, 1]

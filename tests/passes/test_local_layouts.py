"""local_layouts: sharded activations stay local from the column linears and the attention
to their row-parallel consumers. Small hand-written modules pin each case (per-head norm, gated FFN,
a norm over the whole sharded width with its one statistic all-reduce, an op with no rule kept at
full width, the refusal when such an op feeds a statistic), exact on a 2-rank gloo world against an
fp64 single-device run; then every tiny architecture at every mesh shape the suite runs: no pad, no
full-width buffer, nothing kept full."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpcompile.passes._fx import shape
from cpcompile.passes.local_layouts import LayoutError, keep_local
from cpcompile.passes.shard_linears import shard_linears
from cpcompile.distributed import RankContext
from cpcompile.explain import rank_graph
from cpcompile.options import Options
from cpcompile.passes.shard_weights import RankWeights, WeightShard
from cpcompile.tiny import ARCHITECTURES, MLA_ARCHITECTURES, MOE_ARCHITECTURES, tiny_model
from tests.passes._graphs import capture_graph

B, T, H, D, FF = 2, 3, 4, 8, 24  # 4 heads of 8: tp = 2 gives each rank 2 heads (16 columns)
NAMES = {g: f"group_{g}" for g in ("cp", "tp", "replica", "dp", "world")}
_c10d = torch.ops._c10d_functional


class Attn(nn.Module):
    """q -> (a norm) -> RoPE-like pointwise with a [T, D] table -> o: the query path of a layer."""

    def __init__(self, norm: str):
        super().__init__()
        self.norm = norm
        self.q = nn.Linear(H * D, H * D, bias=False)
        self.o = nn.Linear(H * D, H * D, bias=False)
        self.head_w = nn.Parameter(torch.randn(D))
        self.width_w = nn.Parameter(torch.randn(H * D))

    def forward(self, x, cos):
        q = self.q(x)  # [B, T, H*D]
        if self.norm == "width":  # OLMo-2: RMSNorm over the whole projection, before splitting heads
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * self.width_w
        if self.norm == "flip_then_width":  # an op with no local rule feeding a statistic
            q = torch.flip(q, dims=[1])
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.norm == "flip":  # an op with no local rule: kept at full width, exact
            q = torch.flip(q, dims=[1])
        h = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        if self.norm == "head":  # Qwen3: RMSNorm per head
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.head_w
        x1, x2 = h[..., : D // 2], h[..., D // 2 :]
        h = h * cos + torch.cat((-x2, x1), dim=-1) * cos.flip(-1)  # rotate_half
        return self.o(h.transpose(1, 2).reshape(B, T, H * D))


class Ffn(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H * D, FF, bias=False)
        self.up = nn.Linear(H * D, FF, bias=True)
        self.down = nn.Linear(FF, H * D, bias=False)

    def forward(self, x, cos):
        return self.down(F.silu(self.gate(x)) * self.up(x))


_COLUMN = {"q": "o", "gate": "down", "up": "down"}  # column linear -> its row consumer


def _sharded(module: nn.Module, rank: int, tp: int = 2):
    """Capture `module`, shard its linears over `tp` ranks (whole heads / FFN columns of `rank`) with the
    real shard_linears, then run keep_local; returns (gm, counts, example inputs)."""
    torch.manual_seed(0)
    x, cos = torch.randn(B, T, H * D, dtype=torch.float64), torch.randn(T, D, dtype=torch.float64)
    gm = capture_graph(module, x, cos)
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    shards, local = {}, {}
    for n, name in zip(linears, names):
        lin = getattr(module, name)
        out, inp = lin.weight.shape
        kind = "column" if name in _COLUMN else "row"
        width = out if kind == "column" else inp
        cols = torch.arange(rank * width // tp, (rank + 1) * width // tp)
        n.meta["cpcompile_weight"] = f"{name}.weight"
        w = lin.weight.detach()
        bias = lin.bias.detach() if lin.bias is not None else None
        if kind == "column":
            local[f"{name}.weight"] = (w[cols], bias[cols] if bias is not None else None)
        else:
            local[f"{name}.weight"] = (w[:, cols], bias)
        shards[f"{name}.weight"] = WeightShard(f"{name}.weight", kind, "tp", cols, (out, inp))
    shard_linears(gm, RankWeights(shards, local), RankContext.of(Options(tp=tp), rank, NAMES))
    return gm, keep_local(gm), (x, cos)


def _pads(gm) -> int:
    """Pads back to the single-device width (a column shard's scatter is a pad then an index_select)."""
    return sum(n.op == "call_function" and n.target is F.pad for n in gm.graph.nodes)


def _statistics(gm) -> list[tuple]:
    """(shape, group) of every all-reduce that is not a row linear's partial sum."""
    return [(shape(n.args[0]), n.args[2]) for n in gm.graph.nodes
            if n.target is _c10d.all_reduce.default and shape(n.args[0])[-1] == 1]


@pytest.mark.parametrize("module, expect", [
    (lambda: Attn("head"), {"seeds": 1, "ends": 1, "statistics": 0, "kept_full": 0}),
    (lambda: Attn("width"), {"seeds": 1, "ends": 2, "statistics": 1, "kept_full": 0}),
    (lambda: Attn("none"), {"seeds": 1, "ends": 1, "statistics": 0, "kept_full": 0}),
    (lambda: Ffn(), {"seeds": 2, "ends": 1, "statistics": 0, "kept_full": 0}),
])
def test_hand_written_modules_stay_local(module, expect):
    gm, counts, _ = _sharded(module().double(), rank=1)
    assert {k: counts[k] for k in expect} == expect
    assert _pads(gm) == 0  # no pad back to the full width
    assert [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.flip] == []
    widths = {shape(n)[-1] for n in gm.graph.nodes if n.op == "call_function" and "val" in n.meta
              and isinstance(n.meta["val"], torch.Tensor) and n.meta["val"].dim() == 3}
    assert H * D // 2 in widths or FF // 2 in widths
    assert FF not in widths  # no full-width FFN buffer (silu(gate) * up at 12 columns)
    if expect["statistics"]:  # the statistic, not the activations: [B, T, 1] over tp, once
        assert _statistics(gm) == [((B, T, 1), "group_tp")]


def test_an_op_with_no_rule_keeps_the_exact_padded_value():
    gm, counts, _ = _sharded(Attn("flip").double(), rank=0)
    assert counts["kept_full"] == 1 and counts["statistics"] == 0
    assert _pads(gm) == 1  # the one pad that feeds the flip, at the single-device width
    (kept,) = gm.meta["cpcompile_kept_full"]
    assert "flip" in kept


def test_a_statistic_of_a_value_kept_full_is_refused():
    with pytest.raises(LayoutError, match=r"reduces over values that stay at the single-device width.*tp = cp = 1"):
        _sharded(Attn("flip_then_width").double(), rank=0)


def _rank_outputs(kind: str) -> torch.Tensor:
    import torch.distributed as dist

    module = (Ffn() if kind == "ffn" else Attn(kind)).double()
    torch.manual_seed(1)
    for p in module.parameters():
        p.data = torch.randn_like(p)
    names = {"tp": dist.group.WORLD.group_name}
    gm, counts, (x, cos) = _sharded(module, dist.get_rank())
    for n in gm.graph.nodes:  # this world's group in place of the placeholder name
        if n.target is _c10d.all_reduce.default:
            n.args = (n.args[0], n.args[1], names["tp"])
    gm.recompile()
    with torch.no_grad():
        out = gm(*_inputs(gm, module, x, cos))
    ref = module(x, cos)
    return (out[0] if isinstance(out, (tuple, list)) else out) - ref.detach(), counts["statistics"]


def _inputs(gm, module, x, cos):
    """The captured graph's inputs in placeholder order: Dynamo lifts the module's parameters."""
    params = dict(module.named_parameters())
    out = []
    for p in gm.graph.find_nodes(op="placeholder"):
        name = p.target
        if name.startswith("L_x"):
            out.append(x)
        elif name.startswith("L_cos"):
            out.append(cos)
        else:  # L_self_modules_q_parameters_weight_ -> q.weight
            key = name.removeprefix("L_self_").replace("modules_", "").replace("parameters_", "").rstrip("_")
            key = next(k for k in params if k.replace(".", "_") == key)
            out.append(params[key])
    return out


@pytest.mark.parametrize("kind", ["head", "width", "flip", "ffn"])
def test_hand_written_modules_are_exact_on_two_ranks(world2, kind):
    """fp64: the two ranks' outputs equal the single-device module's to 1e-12 (the statistic's
    all-reduce sums 16 + 16 squares where the single device sums 32)."""
    for diff, statistics in world2.run(_rank_outputs, kind):
        assert diff.abs().max().item() < 1e-12
        assert statistics == (1 if kind == "width" else 0)


# ---- every tiny architecture ------------------------------------------------------------------
# (tp, cp, combine, rank): every mesh shape tests/distributed runs, at a rank whose heads are not the
# first. Every architecture at the two that shard the most (the attention output over tp*cp = 4 under
# the all-to-all combine; KV heads repeated at tp = 4 > Hkv = 2); the rest on three architectures
# that cover a per-head norm, a fused qkv / gate_up and MLA (a sweep of all: benchmarks/bench_local_layouts.py).
MESHES = [(2, 1, "all_to_all", 1), (1, 2, "all_to_all", 1), (2, 2, "all_to_all", 3), (2, 2, "all_gather", 2),
          (2, 2, "ag_rs", 1), (4, 1, "all_to_all", 2)]
ALL_ARCHS = ARCHITECTURES + MOE_ARCHITECTURES + MLA_ARCHITECTURES[1:]
CASES = [(a, m) for a in ALL_ARCHS for m in MESHES
         if m in ((2, 2, "all_to_all", 3), (4, 1, "all_to_all", 2)) or a in ("qwen3", "phi3", "deepseek_v2")]
STATISTIC_ARCHS = {"olmo2": 2}  # arch -> all-reduced statistics per layer: OLMo-2 norms q and k over the whole width
CASES += [("olmo2", m) for m in MESHES if m[1] == 1 or m[2] == "all_to_all"]


def _model(arch: str):
    """A tiny.py model, or OLMo-2 (not in tiny.py's sweeps: its q/k norm over the whole projection
    width is this pass's statistic case) at the same tiny sizes."""
    if arch != "olmo2":
        return tiny_model(arch)
    import transformers

    cfg = transformers.Olmo2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _rewritten(arch: str, tp: int, cp: int, combine: str, rank: int):
    """Rank `rank`'s graph of a 2 x 3-token prefill with every pass run, as explain builds it."""
    model = _model(arch)
    report, gm = rank_graph(model, Options(tp=tp, cp=cp, combine=combine), rank=rank, rows=2, tokens=3, max_length=16)
    return model, gm, {k[len("local_"):]: v for k, v in report.counts.items() if k.startswith("local_")}


@pytest.mark.parametrize("arch, mesh", CASES, ids=[f"{a}-{m[0]}x{m[1]}-{m[2]}-r{m[3]}" for a, m in CASES])
def test_no_pad_or_full_width_buffer_on_any_architecture(arch, mesh):
    model, gm, counts = _rewritten(arch, *mesh)
    layers = model.config.num_hidden_layers
    assert counts["kept_full"] == 0, gm.meta["cpcompile_kept_full"]
    assert _pads(gm) == 0  # every pad and scatter the sharding inserted is gone
    assert counts["statistics"] == STATISTIC_ARCHS.get(arch, 0) * layers * (mesh[0] > 1)  # (q, k replicated at tp = 1)
    assert counts["seeds"] >= layers  # at least the attention output of every layer was local
    wide = _full_width_buffers(model, gm)
    assert wide == [], wide[:3]


def _full_width_buffers(model, gm) -> list[str]:
    """Nodes (other than linears on local weights) whose last dim is the FFN's full intermediate size
    (every FFN is sharded at these meshes; Mixtral's is its experts'): the `silu(gate) * up` buffer a
    pad back to full width would leave."""
    from cpcompile.passes._fx import descendants

    width = model.config.intermediate_size
    head = [n for n in gm.graph.nodes if str(n.meta.get("cpcompile_weight", "")).startswith("lm_head")]
    logits = descendants(head, lambda n: False) | set(head)  # (the vocab shard's logits may be as wide)
    out = []
    for n in gm.graph.nodes:
        if n in logits:
            continue
        v = n.meta.get("val")
        if n.op == "call_function" and n.target is not torch._C._nn.linear and isinstance(v, torch.Tensor) \
                and v.dim() >= 2 and v.shape[-1] == width:  # (a local linear's output is local by construction)
            out.append(f"{n.name}{tuple(v.shape)}")
    return out

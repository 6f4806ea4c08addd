"""Hypothesis strategies for cpcompile's equivalence properties (needs `hypothesis`).

    tiny_configs("gemma2")            -> a small, valid transformers.Gemma2Config
    meshes(config, max_world=4)       -> Mesh(tp, cp, dp, combine, ffn, kv_interleave, dp_inputs, moe)
                                         the config can take, on dp*tp*cp <= max_world ranks
    invalid_meshes(config)            -> Mesh(...) it cannot (for error tests)
    prompts(vocab, max_batch, max_len, cp=2, min_batch=dp) -> ragged token lists (left-padded
                                         by assert_equivalent)

Mesh validity is computed from the config's numbers with the rules of
`cpcompile.passes.plan.plan_problems` (which reads the captured graph instead), including the FFN
group's divisibility: the replica's tp*cp ranks for ffn='tp', the tp group for 'sp', all
dp*tp*cp ranks for 'world_tp', and for MoE configs the experts' group (the FFN group, the
replica under 'world_tp') under `moe`: each expert's intermediate dim ('tp') or the expert count
('ep') divisible by it. `tests/testing/test_strategies.py` checks the two agree for every dp,
ffn and moe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from hypothesis import strategies as st

from cpcompile.options import COMBINES, DP_INPUTS, FFNS, MOES

PARALLEL_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "gpt_neox")
"""Architectures cpcompile runs at any valid (tp, cp)."""
MLA_ARCHITECTURES = ("deepseek_v3",)
"""Latent attention (absorbed, slots over tp*cp) with MoE layers; q_lora_rank drawn set or None."""
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe")
"""MoE architectures whose experts cpcompile shards (`moe`='tp' or 'ep'); qwen2_moe has a shared expert."""

_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, max_position_embeddings=1024)
FIRST_TOKEN = 3  # prompts avoid pad / bos / eos


@dataclass(frozen=True)
class Mesh:
    """One way to run a model: `plan.Mesh`'s fields and the options that shape the run."""

    tp: int
    cp: int
    dp: int = 1
    combine: str = "all_to_all"
    ffn: str = "tp"
    kv_interleave: int = 1  # matters only at cp > 1
    dp_inputs: str = "global"  # matters only at dp > 1
    moe: str = "tp"  # matters only for MoE configs whose experts are split (tp*cp > 1)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.cp

    def options(self) -> dict:
        """The keywords of `parallelize` / `assert_equivalent` for this mesh."""
        return dict(tp=self.tp, cp=self.cp, dp=self.dp, combine=self.combine, ffn=self.ffn,
                    kv_interleave=self.kv_interleave, dp_inputs=self.dp_inputs, moe=self.moe)


def tiny_model_from_config(config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A seeded model of `config`, initialised as `cpcompile.tiny.tiny_model` (std 0.2, so
    logits are O(10) and far from ties). Module-level, so `functools.partial(tiny_model_from_config,
    config, seed=s)` is a picklable `model_factory`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.2)
    return model.eval()


# ----------------------------------------------------------------------------- configs


@st.composite
def _heads(draw, max_heads: int = 8):
    """(Hq, Hkv): Hq in 1..max, Hkv a divisor of Hq (GQA, MQA, MHA)."""
    hq = draw(st.sampled_from([h for h in (1, 2, 3, 4, 6, 8) if h <= max_heads]))
    hkv = draw(st.sampled_from([h for h in range(1, hq + 1) if hq % h == 0]))
    return hq, hkv


@st.composite
def tiny_configs(draw, arch: str):
    """A small config of HF architecture `arch` (a name of `cpcompile.tiny.ARCHITECTURES`):
    1-2 layers, 1-8 query heads with any divisor as KV heads, head dims 8-16, widths <= 96,
    sliding windows (mistral, phi3, gemma2, qwen2/3) and softcaps (gemma2)."""
    hq, hkv = draw(_heads())
    d = draw(st.sampled_from([8, 16]))  # even: rotary halves
    common = dict(
        _IDS,
        vocab_size=draw(st.sampled_from([64, 256])),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=hq,
        num_key_value_heads=hkv,
        intermediate_size=draw(st.sampled_from([24, 32, 40, 48, 64])),
    )
    # hidden size where head_dim is its own field; HF still requires a multiple of the heads
    free_width = hq * draw(st.sampled_from([8, 12, 16]))
    window = draw(st.sampled_from([None, 3, 8]))
    if arch == "llama":
        return transformers.LlamaConfig(**common, hidden_size=free_width, head_dim=d,
                                        attention_bias=draw(st.booleans()))
    if arch == "qwen2":
        sliding = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1) if window else {}
        return transformers.Qwen2Config(**common, hidden_size=hq * d, **sliding)
    if arch == "qwen3":
        sliding = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1) if window else {}
        return transformers.Qwen3Config(**common, hidden_size=free_width, head_dim=d, **sliding)
    if arch == "mistral":
        return transformers.MistralConfig(**common, hidden_size=free_width, head_dim=d, sliding_window=window)
    if arch == "gemma2":
        return transformers.Gemma2Config(
            **common, hidden_size=free_width, head_dim=d, query_pre_attn_scalar=d, sliding_window=window or 8,
            attn_logit_softcapping=draw(st.sampled_from([None, 20.0, 50.0])),
            final_logit_softcapping=draw(st.sampled_from([None, 30.0])),
        )
    if arch == "phi3":
        return transformers.Phi3Config(**common, hidden_size=hq * d, sliding_window=window)
    if arch == "gpt_neox":
        common.pop("num_key_value_heads")  # MHA only
        return transformers.GPTNeoXConfig(**common, hidden_size=hq * d, rotary_pct=draw(st.sampled_from([0.25, 0.5, 1.0])),
                                          use_parallel_residual=draw(st.booleans()))
    if arch in MOE_ARCHITECTURES:
        experts = draw(st.sampled_from([2, 4, 8]))
        top_k = draw(st.integers(1, min(3, experts)))
        if arch == "mixtral":
            return transformers.MixtralConfig(**common, hidden_size=hq * d, num_local_experts=experts, num_experts_per_tok=top_k)
        return transformers.Qwen2MoeConfig(
            **common, hidden_size=hq * d, moe_intermediate_size=draw(st.sampled_from([16, 24, 32])), num_experts=experts,
            num_experts_per_tok=top_k, shared_expert_intermediate_size=draw(st.sampled_from([24, 48])),
        )
    if arch == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": hq}, hidden_size=free_width, moe_intermediate_size=16,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=draw(st.integers(0, 1)), kv_lora_rank=16, q_lora_rank=draw(st.sampled_from([None, 24])),
            qk_rope_head_dim=8, qk_nope_head_dim=d, v_head_dim=draw(st.sampled_from([8, 12])),
        )
    raise ValueError(f"tiny_configs: unknown architecture {arch!r}; expected one of "
                     f"{PARALLEL_ARCHITECTURES + MOE_ARCHITECTURES + MLA_ARCHITECTURES}")


# ----------------------------------------------------------------------------- meshes


def _dims(config) -> dict:
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    d = getattr(config, "head_dim", None) or config.hidden_size // hq
    fused_qkv = config.model_type in ("phi3", "gpt_neox")
    return dict(Hq=hq, Hkv=hkv, D=d, I=config.intermediate_size, fused_qkv=fused_qkv)


def _ffn_group(ffn: str, tp: int, cp: int, dp: int) -> int:
    """Ranks the FFN weights are split over (plan's `_FFN_GROUP`): the replica, tp, or every rank."""
    return {"tp": tp * cp, "sp": tp, "world_tp": dp * tp * cp}[ffn]


def mesh_problems(config, tp: int, cp: int, combine: str = "all_to_all", dp: int = 1, ffn: str = "tp", moe: str = "tp") -> list[str]:
    """Why `config` cannot run at (tp, cp, dp, combine, ffn), from its numbers: `plan.plan_problems`'s
    rules applied to the heads and the projection widths (q, k, v / qkv column over tp; o row over
    the replica, or over tp for 'all_gather'; gate, up, down / gate_up / fc1, fc2 over the FFN
    group: the replica (ffn='tp'), tp ('sp') or every rank ('world_tp'))."""
    d, out = _dims(config), []
    hq, hkv = d["Hq"], d["Hkv"]
    if hq % tp:
        out.append(f"Hq={hq} % tp={tp}")
    if (tp > hkv and tp % hkv) or (tp <= hkv and hkv % tp):
        out.append(f"Hkv={hkv} vs tp={tp}")
    if combine in ("all_to_all", "ag_rs") and (hq // tp) % cp:
        out.append(f"Hq/tp={hq // tp} % cp={cp}")
    widths = [("o", hq * d["D"], tp if combine == "all_gather" else tp * cp)]
    if config.model_type in MLA_ARCHITECTURES:  # q and kv_b replicated (Helix); dense first layers, then MoE blocks
        g = tp * cp if ffn != "sp" else tp
        widths = [("o", hq * config.v_head_dim, tp if combine == "all_gather" else tp * cp)]
        if config.first_k_dense_replace > 0:
            widths += [("ffn", config.intermediate_size, _ffn_group(ffn, tp, cp, dp))]
        if config.first_k_dense_replace < config.num_hidden_layers:
            if moe == "ep" and g > 1 and config.n_routed_experts % g:
                out.append(f"{config.n_routed_experts} experts % {g}")
            widths += [("experts", config.moe_intermediate_size, g if moe == "tp" else 1),
                       ("shared expert", config.moe_intermediate_size * config.n_shared_experts, g)]
        return out + [f"{name} width {w} % {n}" for name, w, n in widths if n > 1 and w % n]
    if config.model_type in MOE_ARCHITECTURES:  # every layer a MoE block: experts (+ a shared expert) over the MoE group
        g = tp * cp if ffn != "sp" else tp
        n_experts = getattr(config, "num_local_experts", None) or config.num_experts
        if moe == "ep" and g > 1 and n_experts % g:
            out.append(f"{n_experts} experts % {g}")
        expert_i = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        widths += [("experts", expert_i, g if moe == "tp" else 1)]
        widths += [("shared expert", config.shared_expert_intermediate_size, g)] if hasattr(config, "shared_expert_intermediate_size") else []
    else:
        widths += [("ffn", d["I"], _ffn_group(ffn, tp, cp, dp))]
    widths += [("qkv", (hq + 2 * hkv) * d["D"], tp)] if d["fused_qkv"] else [("q", hq * d["D"], tp), ("kv", hkv * d["D"], tp)]
    out += [f"{name} width {w} % {g}" for name, w, g in widths if g > 1 and w % g]
    return out


def valid_meshes_of(config, max_world: int = 4, combine: str = "all_to_all", dp: int = 1, ffn: str = "tp",
                    moe: str = "tp") -> list[tuple[int, int]]:
    """(tp, cp) with dp*tp*cp <= max_world, in `plan.valid_meshes`'s order."""
    return [(tp, cp) for tp in range(1, max_world // dp + 1) for cp in range(1, max_world // (dp * tp) + 1)
            if not mesh_problems(config, tp, cp, combine, dp, ffn, moe)]


def _all_meshes(max_world: int, dps=None, ffns=FFNS) -> list[tuple[int, int, int, str, str]]:
    """Every (dp, tp, cp, combine, ffn) of at most `max_world` ranks, dp in `dps` (None: any)."""
    return [(dp, tp, cp, c, f) for dp in range(1, max_world + 1) if dps is None or dp in dps
            for tp in range(1, max_world // dp + 1) for cp in range(1, max_world // (dp * tp) + 1)
            for c in COMBINES for f in ffns]


@st.composite
def meshes(draw, model_config, max_world: int = 4, min_world: int = 1, max_interleave: int = 3, dps=None, ffns=FFNS,
           dp_inputs=DP_INPUTS):
    """A `Mesh` `model_config` can take, min_world <= dp*tp*cp <= max_world (falling back to
    dp = tp = cp = 1, always valid, when no larger one is), dp in `dps` (None: any), ffn in
    `ffns`; kv_interleave is drawn only at cp > 1, dp_inputs (from `dp_inputs`) only at dp > 1."""
    moes = MOES if model_config.model_type in MOE_ARCHITECTURES else ("tp",)
    choices = [(dp, tp, cp, c, f, m) for dp, tp, cp, c, f in _all_meshes(max_world, dps, ffns) for m in moes
               if dp * tp * cp >= min_world and not mesh_problems(model_config, tp, cp, c, dp, f, m)]
    dp, tp, cp, combine, ffn, moe = draw(st.sampled_from(choices or [(1, 1, 1, "all_to_all", "tp", "tp")]))
    interleave = draw(st.integers(1, max_interleave)) if cp > 1 else 1
    inputs = draw(st.sampled_from(dp_inputs)) if dp > 1 else "global"
    return Mesh(tp, cp, dp, combine, ffn, interleave, inputs, moe)


@st.composite
def invalid_meshes(draw, model_config, max_world: int = 16, dps=None):
    """A `Mesh` (tp, cp, dp >= 1, a known combine and ffn) `model_config` cannot take, on
    dp*tp*cp <= max_world ranks, dp in `dps` (None: any)."""
    choices = [(dp, tp, cp, c, f) for dp, tp, cp, c, f in _all_meshes(max_world, dps)
               if mesh_problems(model_config, tp, cp, c, dp, f)]
    dp, tp, cp, combine, ffn = draw(st.sampled_from(choices) if choices else st.nothing())
    inputs = draw(st.sampled_from(DP_INPUTS)) if dp > 1 else "global"
    return Mesh(tp, cp, dp, combine, ffn, draw(st.integers(1, 3)), inputs)


# ----------------------------------------------------------------------------- prompts


@st.composite
def prompts(draw, vocab: int, max_batch: int = 3, max_len: int = 8, cp: int = 1, min_batch: int = 1):
    """A batch of min_batch..max(min_batch, max_batch) token lists of lengths 1..max_len (ragged,
    so rows are left-padded), which includes, with cp > 1, prompts shorter than cp (CP ranks with
    nothing at prefill). With dp replicas pass min_batch=dp: each replica needs a row."""
    batch = draw(st.integers(min_batch, max(min_batch, max_batch)))
    short = st.integers(1, max(1, cp - 1)) if cp > 1 else st.integers(1, max_len)
    length = st.one_of(short, st.integers(1, max_len))
    token = st.integers(FIRST_TOKEN, vocab - 1)
    return [draw(st.lists(token, min_size=n, max_size=n)) for n in draw(st.lists(length, min_size=batch, max_size=batch))]

"""Tiny configs of the Hugging Face architectures cpcompile supports, for tests, examples and
benchmarks (no downloads: weights are seeded random).

`tiny_model("llama")` builds `AutoModelForCausalLM.from_config(tiny_config("llama"))` under a
fixed seed. Sizes are small but keep every structural feature: GQA, q/k norms, sliding
window, softcaps, fused qkv/gate_up, partial rotary with parallel residual, MLA with
`Dk != Dv` and MoE layers (routed experts, shared experts).
"""

from __future__ import annotations

import torch
import transformers

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def _configs() -> dict[str, transformers.PretrainedConfig]:
    c = dict(_COMMON)
    return {
        "llama": transformers.LlamaConfig(**c),
        "qwen2": transformers.Qwen2Config(**c),
        "qwen3": transformers.Qwen3Config(**c, head_dim=16),
        "mistral": transformers.MistralConfig(**c, sliding_window=8),
        "gemma2": transformers.Gemma2Config(
            **c, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0
        ),
        "phi3": transformers.Phi3Config(**c),
        "gpt_neox": transformers.GPTNeoXConfig(
            **{k: v for k, v in c.items() if k != "num_key_value_heads"}, rotary_pct=0.5, use_parallel_residual=True
        ),
        "deepseek_v3": transformers.DeepseekV3Config(
            **{**c, "num_key_value_heads": 4},
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=12,
        ),
        # MLA without a query down-projection (DeepSeek-V2-Lite's shape: q_lora_rank=None), MoE from layer 1
        "deepseek_v2": transformers.DeepseekV2Config(
            **{**c, "num_key_value_heads": 4},
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=24,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=12,
            v_head_dim=16,
        ),
        # MoE (transformers' 3-D experts, "grouped_mm" implementation): top-2 of 4; the second has a
        # shared expert beside top-3 of 4 routed ones
        "mixtral": transformers.MixtralConfig(**{**c, "intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": transformers.Qwen2MoeConfig(
            **c, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=3
        ),
    }


MOE_ARCHITECTURES = ("mixtral", "qwen2_moe")  # beside ARCHITECTURES (whose sweeps they would lengthen)
MLA_ARCHITECTURES = ("deepseek_v3", "deepseek_v2")  # latent attention: q_lora_rank set / None (tests/distributed/test_mla.py)
ARCHITECTURES = tuple(a for a in _configs() if a not in MOE_ARCHITECTURES and a != "deepseek_v2")


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    configs = _configs()
    if arch not in configs:
        raise ValueError(f"tiny_config: unknown architecture {arch!r}; expected one of {tuple(configs)}")
    cfg = configs[arch]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(
    arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, linear_form: str = "linear", **overrides
) -> torch.nn.Module:
    """`linear_form`: how the model's projections are written (`LINEAR_FORMS`): 'linear' as HF
    builds it, 'matmul' (`x @ W.T`), 'conv1d' (`addmm(b, x, W)` with W stored [in, out], GPT-2's
    Conv1D); the same weights, so every form computes the same model."""
    cfg = tiny_config(arch, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        # HF's default init is small (std 0.02): widen it so logits are far from ties and
        # greedy equality tests are meaningful.
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.2)
    if linear_form not in LINEAR_FORMS:
        raise ValueError(f"tiny_model: linear_form={linear_form!r}; expected one of {LINEAR_FORMS}")
    if linear_form != "linear":
        _rewrite_linears(model, linear_form)
    return model.eval()


class MatmulLinear(torch.nn.Linear):
    """A Linear subclass overriding `forward` (Dynamo records a matmul, not F.linear)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


class AddmmConv1D(torch.nn.Module):
    """GPT-2's Conv1D form: the weight stored [in, out], applied with addmm on flattened rows."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.nf = linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous())
        self.bias = torch.nn.Parameter(
            linear.bias.detach().clone() if linear.bias is not None else torch.zeros(self.nf, dtype=linear.weight.dtype)
        )

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(x.shape[:-1] + (self.nf,))


LINEAR_FORMS = ("linear", "matmul", "conv1d")


def _rewrite_linears(model: torch.nn.Module, form: str) -> None:
    """Every nn.Linear of the decoder layers (and, for 'matmul', the LM head, its weight object
    kept so a tie to the embedding stays) rewritten into `form`."""
    for name, mod in list(model.named_modules()):
        if type(mod) is not torch.nn.Linear or (form == "conv1d" and ".layers." not in f".{name}"):
            continue
        if form == "matmul":
            new = MatmulLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            new.weight, new.bias = mod.weight, mod.bias
        else:
            new = AddmmConv1D(mod)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, new)

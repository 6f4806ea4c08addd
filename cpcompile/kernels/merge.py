"""``torch.ops.cpcompile.merge_states``: exact LSE-weighted merge of R partial attentions.

    o_merged, lse_merged = torch.ops.cpcompile.merge_states(o, lse)

    o   [R, B, H, L, D]  float32 / bfloat16 / float16     lse [R, B, H, L] float32, natural log
    ->  o_merged [B, H, L, D] (o's dtype), lse_merged [B, H, L] float32

``lse_merged = logsumexp_r lse_r`` and ``o_merged = sum_r exp(lse_r - lse_merged) * o_r``,
accumulated in fp32. A partial with ``lse = -inf`` contributes nothing; if all are
``-inf`` the result is ``o = 0``, ``lse = -inf``. The spec is ``reference.merge_states_ref``.
"""

from __future__ import annotations

import torch

from cpcompile.kernels._checks import check_merge_args


def merge_states_torch(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch implementation (the CPU path)."""
    check_merge_args(o, lse)
    m = lse.amax(dim=0)  # [B, H, L]
    m = m.masked_fill(m == float("-inf"), 0.0)  # all partials empty: weights exp(-inf) = 0, no NaN
    w = torch.exp(lse - m)  # [R, B, H, L]
    denom = w.sum(dim=0)  # [B, H, L]; >= 1 (max term is exp(0)) or 0 if all empty
    o_merged = (w[..., None] * o.float()).sum(dim=0) / denom.clamp_min(1.0)[..., None]
    return o_merged.to(o.dtype), m + torch.log(denom)


@torch.library.custom_op("cpcompile::merge_states", mutates_args=())
def merge_states(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return merge_states_torch(o, lse)


@merge_states.register_kernel("cuda")
def merge_states_cuda(o, lse):
    from cpcompile.kernels import triton_launch  # triton is optional; imported on first CUDA call

    return triton_launch.merge_states(o, lse)


@merge_states.register_fake
def _merge_states_fake(o, lse):
    check_merge_args(o, lse)
    _, B, H, L, D = o.shape
    return o.new_empty((B, H, L, D)), lse.new_empty((B, H, L))

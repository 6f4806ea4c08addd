"""The spec: small float64 pure-torch references for the two cpcompile ops.

Obviously correct rather than fast (repeat_kv is fine here). Both the torch
implementation and the Triton kernels are tested against these. LSE is natural log.
"""

from __future__ import annotations

import torch


def attention_with_lse_ref(q, k, v, pos_q, pos_kv, scale, softcap=0.0, window=0, mask=None, filled=None):
    """q [B, Hq, Lq, Dk], k [B, Hkv, S, Dk], v [B, Hkv, S, Dv] -> o [B, Hq, Lq, Dv], lse [B, Hq, Lq] (float64).

    ``filled`` [B] int or None: slots ``s >= filled[b]`` (clamped to [0, S]) of row ``b`` are
    empty -- invisible, and their contents (even NaN) never reach the result.
    """
    S = k.shape[2]
    live = torch.ones(k.shape[0], S, dtype=torch.bool, device=k.device)  # [B, S]
    if filled is not None:
        live = torch.arange(S, device=k.device)[None, :] < filled.clamp(0, S)[:, None]
        k = k.masked_fill(~live[:, None, :, None], 0.0)  # never read: 0 * NaN would leak into q.k, p.v
        v = v.masked_fill(~live[:, None, :, None], 0.0)
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [B, Hq, S, Dk]
    v = v.double().repeat_interleave(group, dim=1)  # [B, Hq, S, Dv]
    logits = scale * (q.double() @ k.transpose(-1, -2))  # [B, Hq, Lq, S]
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    pq, pk = pos_q[:, :, None], pos_kv[:, None, :]  # [B, Lq, 1], [B, 1, S]
    visible = (pk >= 0) & (pk <= pq) & live[:, None, :]  # [B, Lq, S]
    if window > 0:
        visible = visible & (pq - pk < window)
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        logits = logits + mask.double()[:, None]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hq, Lq]; -inf where nothing is visible
    p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)  # rows with lse=-inf give 0
    return p @ v, lse


def merge_states_ref(o, lse):
    """o [R, B, H, L, D], lse [R, B, H, L] -> o [B, H, L, D], lse [B, H, L] (float64)."""
    lse = lse.double()
    lse_merged = torch.logsumexp(lse, dim=0)  # [B, H, L]
    w = torch.exp(lse - lse_merged).nan_to_num(0.0)  # [R, B, H, L]; all -inf -> 0
    return (w[..., None] * o.double()).sum(0), lse_merged

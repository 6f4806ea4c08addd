"""``torch.ops.cpcompile.attention_with_lse``: attention over this rank's KV slots, with LSE.

    o, lse = torch.ops.cpcompile.attention_with_lse(q, k, v, pos_q, pos_kv, scale,
                                                    softcap=0.0, window=0, mask=None, filled=None)

    q      [B, Hq, Lq, Dk]   float32 / bfloat16 / float16, any strides
    k      [B, Hkv, S, Dk]   same dtype; this rank's KV slots (views of a cache are fine)
    v      [B, Hkv, S, Dv]   Dv may differ from Dk
    pos_q  [B, Lq]           integer, global position of each query token
    pos_kv [B, S]            integer, global position of each slot; < 0 marks an empty slot
    mask   [B, Lq, S]        optional; bool (True = visible) or float (additive bias)
    filled [B]               optional; integer, on q's device: slots s >= filled[b] of row b
                             are empty and never read (clamped to [0, S]; None = all S)
    ->  o   [B, Hq, Lq, Dv]  q's dtype
        lse [B, Hq, Lq]      float32, natural log

Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA/MQA, no repeat_kv). Slot ``s`` is
visible to query ``t`` of row ``b`` iff ``s < filled[b]``, ``0 <= pos_kv[s] <= pos_q[t]``,
``pos_q[t] - pos_kv[s] < window`` (when ``window > 0``) and the mask allows it. Logits are ``scale * q.k``, then
``softcap * tanh(logits / softcap)`` when ``softcap > 0`` (Gemma 2 order), then + the
additive mask. A query with no visible slot gets ``lse = -inf`` and ``o = 0``.

``filled`` is what makes decode cost follow the live context rather than the static cache
length: the cache fills in slot order, so slots ``>= filled[b]`` are skipped -- their K, V,
positions and mask entries are not read at all (garbage or NaN there is harmless). It is a
device tensor rather than a Python int so that a CUDA graph replays it with new values and
torch.compile never specialises (or recompiles) on it.

Dispatch: CUDA tensors run the Triton split-KV kernel (``triton_launch``); any other
device runs the pure-torch implementation below. The spec is ``reference.attention_with_lse_ref``.
"""

from __future__ import annotations

from typing import Optional

import torch

from cpcompile.kernels._checks import check_attention_args


def visibility(pos_q: torch.Tensor, pos_kv: torch.Tensor, window: int,
               mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, Lq, S] bool: slot s visible to query t (positions, causality, window, bool mask)."""
    pq, pk = pos_q[:, :, None], pos_kv[:, None, :]  # [B, Lq, 1], [B, 1, S]
    visible = (pk >= 0) & (pk <= pq)
    if window > 0:
        visible &= pq - pk < window
    if mask is not None and mask.dtype == torch.bool:
        visible &= mask
    return visible


def attention_with_lse_torch(q, k, v, pos_q, pos_kv, scale, softcap=0.0, window=0, mask=None, filled=None):
    """Pure-torch implementation (the CPU path). fp32 accumulation, no repeat_kv.

    fp32 K/V are used in place (any strides); bf16/fp16 K/V are upcast per call, as CPU
    matmuls cannot accumulate low-precision inputs into an fp32 result.

    ``filled``: everything below runs on the first ``n = max(filled)`` slots only, so the cost
    is O(n), not O(S). Reading ``n`` is a host sync; fine here, as the op is opaque to the
    compiler and this is the CPU path (the Triton path never syncs on it).
    """
    check_attention_args(q, k, v, pos_q, pos_kv, scale, softcap, window, mask, filled)
    if filled is not None:
        k, v, pos_kv, mask = _filled_prefix(k, v, pos_kv, mask, filled)
    B, Hq, Lq, Dk = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    # The G query heads of a KV head become G*Lq rows of one matmul against that head. The
    # logits are laid out [.., S, rows] (K @ Q^T): with few rows (decode) this GEMM streams
    # K as the large row-major operand, about 2x faster on CPU than Q @ K^T.
    qg = (q.float() * scale).reshape(B, Hkv, G * Lq, Dk)  # [B, Hkv, G*Lq, Dk]
    logits = torch.matmul(k.float(), qg.transpose(-1, -2))  # [B, Hkv, S, G*Lq]
    logits = logits.view(B, Hkv, S, G, Lq)
    if softcap > 0:
        logits = torch.tanh(logits.div_(softcap)).mul_(softcap)
    if mask is not None and mask.dtype != torch.bool:
        logits += mask.float().transpose(1, 2)[:, None, :, None, :]  # [B, 1, S, 1, Lq]
    hidden = ~visibility(pos_q, pos_kv, window, mask)  # [B, Lq, S]
    logits.masked_fill_(hidden.transpose(1, 2)[:, None, :, None, :], float("-inf"))
    if S > 0:  # max(dim).values, not amax: 5x faster on CPU over a non-innermost dim (torch 2.13)
        m = logits.max(dim=2, keepdim=True).values  # [B, Hkv, 1, G, Lq]
    else:
        m = logits.new_full((B, Hkv, 1, G, Lq), float("-inf"))
    m = m.masked_fill(m == float("-inf"), 0.0)  # empty rows: exp(-inf - 0) = 0, no NaN
    p = logits.sub_(m).exp_()  # [B, Hkv, S, G, Lq], in place: this is the CPU decode hot path
    denom = p.sum(dim=2, keepdim=True)  # [B, Hkv, 1, G, Lq]; >= 1 (max term is exp(0)) or 0 if empty
    o = torch.matmul(p.view(B, Hkv, S, G * Lq).transpose(-1, -2), v.float())  # [B, Hkv, G*Lq, Dv]
    o = o.view(B, Hkv, G, Lq, Dv).div_(denom.view(B, Hkv, G, Lq, 1).clamp_min(1.0))
    lse = (m + torch.log(denom)).view(B, Hq, Lq)  # log(0) = -inf on empty rows
    return o.view(B, Hq, Lq, Dv).to(q.dtype), lse


def _filled_prefix(k, v, pos_kv, mask, filled):
    """Cut k, v, pos_kv, mask to the first n = max(filled) slots; rows filled below n get
    their slots [filled[b], n) marked empty (pos -1) and their V zeroed there."""
    S = k.shape[2]
    filled = filled.clamp(0, S)  # [B]
    n = int(filled.max()) if filled.numel() else 0
    k, v, pos_kv = k[:, :, :n], v[:, :, :n], pos_kv[:, :n]
    mask = None if mask is None else mask[..., :n]
    live = torch.arange(n, device=k.device)[None, :] < filled[:, None]  # [B, n]
    if not bool(live.all()):
        # Same rule as an unwritten slot. V is zeroed too: its probability is 0 there, but
        # 0 * NaN is NaN in the P.V matmul (K needs nothing: its logits are overwritten by -inf).
        pos_kv = pos_kv.masked_fill(~live, -1)
        v = v.masked_fill(~live[:, None, :, None], 0.0)
    return k, v, pos_kv, mask


@torch.library.custom_op("cpcompile::attention_with_lse", mutates_args=())
def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_q: torch.Tensor,
    pos_kv: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    mask: Optional[torch.Tensor] = None,
    filled: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_with_lse_torch(q, k, v, pos_q, pos_kv, scale, softcap, window, mask, filled)


@attention_with_lse.register_kernel("cuda")
def attention_with_lse_cuda(q, k, v, pos_q, pos_kv, scale, softcap=0.0, window=0, mask=None, filled=None):
    from cpcompile.kernels import triton_launch  # triton is optional; imported on first CUDA call

    return triton_launch.attention_with_lse(q, k, v, pos_q, pos_kv, scale, softcap, window, mask, filled)


@attention_with_lse.register_fake
def _attention_with_lse_fake(q, k, v, pos_q, pos_kv, scale, softcap=0.0, window=0, mask=None, filled=None):
    check_attention_args(q, k, v, pos_q, pos_kv, scale, softcap, window, mask, filled)
    B, Hq, Lq, _ = q.shape
    o = q.new_empty((B, Hq, Lq, v.shape[3]))
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    return o, lse

"""Launchers for the Triton kernels: validate, allocate, choose splits/blocks, grid, launch.

Called by the ops on CUDA tensors; callable directly on CPU tensors under
``TRITON_INTERPRET=1`` (the tests do). Triton is optional: without it this module still
imports and the launchers raise a clear error.
"""

from __future__ import annotations

import math
import os

import torch

from cpcompile.kernels._checks import check_attention_args, check_merge_args

try:
    from cpcompile.kernels import triton_attention as _tk
except ImportError as e:  # triton not installed (e.g. macOS, CPU-only wheels)
    _tk, _TRITON_IMPORT_ERROR = None, e


def _require_triton(op: str) -> None:
    if _tk is None:
        raise RuntimeError(
            f"{op}: the CUDA path needs Triton, which failed to import ({_TRITON_IMPORT_ERROR!r}); "
            f"install triton>=3.9 (pip install 'triton>=3.9,<3.10') or run on CPU"
        )


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(n - 1, 0).bit_length())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (CUDA); a small stand-in under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Split-KV sizing. Decode (Lq=1) has only B*Hkv (batch, KV head) programs, far fewer than a
# GPU's SMs, and each streams a long KV shard: splitting the shard gives enough programs in
# flight to saturate memory bandwidth. More splits cost a bigger merge, so stop at
# WAVES programs per SM and keep at least MIN_BLOCKS_PER_SPLIT KV blocks in each split.
WAVES = 4
MIN_BLOCKS_PER_SPLIT = 2
MAX_SPLITS = 256


def choose_num_splits(num_blocks: int, programs_per_split: int, sms: int) -> int:
    """Number of KV splits for ``num_blocks`` KV blocks when each split launches
    ``programs_per_split`` programs (B * Hkv * M-tiles) on a device with ``sms`` SMs."""
    want = math.ceil(WAVES * sms / max(programs_per_split, 1))
    most = max(num_blocks // MIN_BLOCKS_PER_SPLIT, 1)
    return max(1, min(want, most, MAX_SPLITS))


def attention_with_lse(q, k, v, pos_q, pos_kv, scale, softcap=0.0, window=0, mask=None, filled=None,
                       *, num_splits=None, block_n=None, block_m=None, num_warps=None, num_stages=None):
    """Triton attention-with-LSE; same contract as ``torch.ops.cpcompile.attention_with_lse``.

    ``num_splits``/``block_n``/``block_m``/``num_warps``/``num_stages`` override the heuristics
    (tests use them to force several splits and M tiles on small shapes;
    ``benchmarks/tune_attention.py`` sweeps them on a GPU).

    ``filled`` never changes the grid: splits are sized for all S slots and the kernel reads
    ``filled[b]`` on the device to cut each program's KV range (no host sync; graph-safe).
    """
    check_attention_args(q, k, v, pos_q, pos_kv, scale, softcap, window, mask, filled)
    _require_triton("attention_with_lse")
    B, Hq, Lq, Dk = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    o = torch.empty((B, Hq, Lq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if S == 0 or o.numel() == 0 or lse.numel() == 0:  # nothing to read: every row is empty
        return o.zero_(), lse.fill_(float("-inf"))

    rows = G * Lq  # (query head of the group, query token) pairs: the M dimension
    BLOCK_DK, BLOCK_DV = _pow2(Dk), _pow2(Dv)
    if _interpreted():  # the interpreter's cost is per op, not per element: big tiles
        BLOCK_M, BLOCK_N = block_m or min(_pow2(rows), 128), block_n or 128
    else:  # GPU: 16-64 query rows x 64 slots (32 for head dims > 128) keeps registers in check
        BLOCK_M = block_m or min(_pow2(rows), 64)
        BLOCK_N = block_n or (64 if max(BLOCK_DK, BLOCK_DV) <= 128 else 32)
    m_tiles = math.ceil(rows / BLOCK_M)
    num_blocks = math.ceil(S / BLOCK_N)
    splits = num_splits or choose_num_splits(num_blocks, B * Hkv * m_tiles, num_sms(q.device))
    blocks_per_split = math.ceil(num_blocks / min(splits, num_blocks))
    splits = math.ceil(num_blocks / blocks_per_split)  # no empty splits

    if splits == 1:  # write the result directly
        o_part, lse_part, l_part = o.unsqueeze(0), lse.unsqueeze(0), lse
    else:  # raw softmax states per split: acc, max m, sum l
        o_part = torch.empty((splits, B, Hq, Lq, Dv), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, B, Hq, Lq), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(lse_part)

    if mask is None:
        mask_kind, m_arg, m_strides = 0, pos_kv, (0, 0, 0)
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        m_arg = mask.view(torch.uint8) if mask_kind == 1 else mask
        m_strides = m_arg.stride()
    f_arg, f_stride = (pos_kv, 0) if filled is None else (filled, filled.stride(0))
    grid = (B * Hkv, splits, m_tiles)
    _tk.attention_split_kernel[grid](
        q, k, v, pos_q, pos_kv, m_arg, f_arg, o_part, lse_part, l_part,
        *q.stride(), *k.stride(), *v.stride(), *pos_q.stride(), *pos_kv.stride(), *m_strides,
        f_stride, *o_part.stride(), *lse_part.stride(),
        Hkv, Lq, S, Dk, Dv, G, float(scale), float(softcap), int(window), blocks_per_split,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_DK=BLOCK_DK, BLOCK_DV=BLOCK_DV,
        MASK_KIND=mask_kind, HAS_FILLED=filled is not None, SOFTCAP=softcap > 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=_interpreted() and q.dtype == torch.bfloat16,
        WRITE_STATE=splits > 1,
        num_warps=num_warps or 4, num_stages=num_stages or (1 if _interpreted() else 3),
    )
    if splits > 1:
        _merge_into(o_part, lse_part, o, lse, l=l_part)
    return o, lse


def merge_states(o, lse):
    """Triton merge_states; same contract as ``torch.ops.cpcompile.merge_states``."""
    check_merge_args(o, lse)
    _require_triton("merge_states")
    _, B, H, L, D = o.shape
    out_o = torch.empty((B, H, L, D), dtype=o.dtype, device=o.device)
    out_lse = torch.empty((B, H, L), dtype=torch.float32, device=o.device)
    _merge_into(o, lse, out_o, out_lse)
    return out_o, out_lse


def _merge_into(o, lse, out_o, out_lse, l=None) -> None:
    """o [R, B, H, L, D], lse [R, B, H, L] -> writes out_o [B, H, L, D], out_lse [B, H, L].

    With ``l`` [R, B, H, L] (same strides as lse) the inputs are raw softmax states
    (acc, max, sum) from the split attention kernel instead of normalised (o, lse).
    """
    R, B, H, L, D = o.shape
    num_rows = B * H * L
    if num_rows == 0:
        return
    BLOCK_D = _pow2(D, lo=1)
    BLOCK_ROWS = max(1, min(16, 4096 // BLOCK_D))
    grid = (math.ceil(num_rows / BLOCK_ROWS),)
    _tk.merge_states_kernel[grid](
        o, lse, lse if l is None else l, out_o, out_lse,
        *o.stride(), *lse.stride(), *out_o.stride(), *out_lse.stride(),
        R, H, L, D, num_rows,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=BLOCK_D, HAS_L=l is not None, num_warps=4,
    )

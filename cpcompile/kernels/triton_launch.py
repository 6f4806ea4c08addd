"""Launchers for the Triton kernels: validate, allocate, choose splits/blocks, grid, launch.

Called by the ops on CUDA tensors; callable directly on CPU tensors under
``TRITON_INTERPRET=1`` (the tests do). Triton is optional: without it this module still
imports and the launchers raise a clear error.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

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


# Each split writes, and the merge reads back, an fp32 state (acc [Dv], m, l) per query row.
# With GQA at D=128 that is ~1/500 of the KV a split reads; with MLA decode (128 query heads on
# one 576-wide KV head) one split's states weigh as much as ~460 KV slots, so the split count
# is also capped to keep the states under STATE_TRAFFIC of the KV bytes.
STATE_TRAFFIC = 0.25


def choose_num_splits(num_blocks: int, programs_per_split: int, sms: int, max_splits: int = MAX_SPLITS) -> int:
    """Number of KV splits for ``num_blocks`` KV blocks when each split launches
    ``programs_per_split`` programs (B * Hkv * M-tiles) on a device with ``sms`` SMs;
    ``max_splits``: the cap from the split states' traffic (``state_split_cap``)."""
    want = math.ceil(WAVES * sms / max(programs_per_split, 1))
    most = max(num_blocks // MIN_BLOCKS_PER_SPLIT, 1)
    return max(1, min(want, most, MAX_SPLITS, max_splits))


def state_split_cap(kv_bytes: int, rows: int, Dv: int) -> int:
    """Most splits whose fp32 states (``rows`` query rows of acc [Dv] + m + l, written and
    read back) stay within STATE_TRAFFIC of the ``kv_bytes`` the call reads."""
    state_bytes = rows * (Dv + 2) * 4 * 2
    return max(1, int(STATE_TRAFFIC * kv_bytes / max(state_bytes, 1)))


def split_head_dim(Dk: int) -> tuple[int, int]:
    """K head dim -> (main, tail) tile widths: main is the largest power of two <= Dk (16 at
    least), tail the rest padded to a power of two >= 16 (0 if none). 576 -> (512, 64),
    192 -> (128, 64), 24 -> (16, 16), 128 -> (128, 0). Never wider than the next power of two."""
    main = max(16, 1 << max(Dk.bit_length() - 1, 0))
    return main, (_pow2(Dk - main) if Dk > main else 0)


@dataclass(frozen=True)
class Blocks:
    """Tiles and launch options of ``attention_split_kernel`` for one shape."""

    block_m: int  # query rows (group head, token) per program
    block_n: int  # KV slots per block
    block_dk: int  # main part of Dk (split_head_dim)
    block_dt: int  # Dk's tail past block_dk, padded; 0 = none
    block_dv: int  # Dv padded to a power of two >= 16
    num_warps: int
    num_stages: int


def choose_blocks(Dk: int, Dv: int, rows: int, interpreted: bool) -> Blocks:
    """Tiles for ``rows`` query rows (G * Lq) of head dims Dk, Dv.

    GPU, head widths <= 256: 16-64 query rows x 64 slots (32 above 128 columns), 4 warps,
    3 stages. Wider (MLA's 576/512): 64 rows x 32 slots, 8 warps, 2 stages -- the fp32
    accumulator [64, 512] is 128 registers per thread over 8 warps (256 over 4: spills), and
    Q (72 KiB) plus two stages of K (32 x 576 bf16, 36 KiB each) is 144 KiB of shared memory,
    208 KiB when V is loaded separately: under Hopper's 227 KiB per block (docs/kernels.md
    has the compiled figures).
    """
    block_dk, block_dt = split_head_dim(Dk)
    block_dv = _pow2(Dv)
    width = max(block_dk + block_dt, block_dv)
    if interpreted:  # the interpreter's cost is per op, not per element: big tiles
        return Blocks(min(_pow2(rows), 128), 128, block_dk, block_dt, block_dv, 4, 1)
    if width <= 256:
        return Blocks(min(_pow2(rows), 64), 64 if width <= 128 else 32, block_dk, block_dt, block_dv, 4, 3)
    return Blocks(min(_pow2(rows), 64), 32, block_dk, block_dt, block_dv, 8, 2)


def v_is_k_prefix(k: torch.Tensor, v: torch.Tensor) -> bool:
    """v holds k's first Dv columns (MLA's joint latent cache: k = kv, v = kv[..., :Dv])."""
    return v.data_ptr() == k.data_ptr() and v.stride() == k.stride() and v.shape[3] <= k.shape[3]


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
    blocks = choose_blocks(Dk, Dv, rows, _interpreted())
    BLOCK_M, BLOCK_N = block_m or blocks.block_m, block_n or blocks.block_n
    # MLA's joint cache: V is read as the main K tile's first Dv columns, not loaded again.
    v_aliases_k = v_is_k_prefix(k, v)
    v_from_k = v_aliases_k and blocks.block_dv == blocks.block_dk
    m_tiles = math.ceil(rows / BLOCK_M)
    num_blocks = math.ceil(S / BLOCK_N)
    kv_bytes = B * Hkv * S * (Dk if v_aliases_k else Dk + Dv) * k.element_size()
    splits = num_splits or choose_num_splits(num_blocks, B * Hkv * m_tiles, num_sms(q.device),
                                             state_split_cap(kv_bytes, B * Hq * Lq, Dv))
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
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_DK=blocks.block_dk, BLOCK_DT=blocks.block_dt,
        BLOCK_DV=blocks.block_dv, V_FROM_K=v_from_k,
        MASK_KIND=mask_kind, HAS_FILLED=filled is not None, SOFTCAP=softcap > 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=_interpreted() and q.dtype == torch.bfloat16,
        WRITE_STATE=splits > 1,
        num_warps=num_warps or blocks.num_warps, num_stages=num_stages or blocks.num_stages,
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

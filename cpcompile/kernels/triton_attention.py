"""Triton kernel bodies for attention-with-LSE (split-KV "flash-decoding") and state merge.

Launchers live in ``triton_launch.py``; the spec is ``reference.py``.

LSE convention: every LSE and every running max here is **natural log** (``lse_natural``),
as in memory. Exponentials are computed as ``exp2((x - m) * LOG2E)`` -- exp2 is the native
instruction -- with the max subtracted *before* the change of base, so large-magnitude
logits (|x| ~ 1e4) lose no precision to ``x * LOG2E`` rounding. A softmax *state* below is
``(m, l, acc)``: running max ``m`` of the logits (``-inf`` while nothing was visible),
``l = sum exp(s - m)``, ``acc = sum exp(s - m) * v`` (fp32, unnormalised). An empty state
is ``(-inf, 0, 0)``; every helper keeps it NaN-free by subtracting 0 instead of ``-inf``
when the max is ``-inf``.
"""

import triton
import triton.language as tl

# Reductions and zero-fills use core builtins only: tl.reduce with triton.language.standard's
# own combine functions (what tl.max / tl.sum call), tl.full instead of tl.zeros. The @jit
# wrappers tl.max / tl.sum / tl.zeros are interpretable only if triton was imported after
# TRITON_INTERPRET=1 was set, and torch._dynamo imports triton early; the interpreter also
# recognises these combine functions and reduces with numpy. Same code on the GPU.

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) * LN2
NEG_INF = tl.constexpr(float("-inf"))  # instances, not annotations: the compiler reads only these


@triton.jit
def row_max(x):
    """[M, N] -> [M]"""
    return tl.reduce(x, 1, tl.standard._elementwise_max)


@triton.jit
def row_sum(x):
    """[M, N] -> [M]"""
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def exp(x):
    """Natural exp via the native exp2."""
    return tl.exp2(x * LOG2E)


@triton.jit
def tanh(x):
    """tanh without overflow for large |x| (no tanh in core tl)."""
    e = exp(-2.0 * tl.abs(x))  # in (0, 1]
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a [M, K] @ b [K, N] with fp32 accumulation.

    UPCAST: the Triton 3.9 *interpreter* gets bf16 x bf16 tl.dot wrong (garbage), so under
    TRITON_INTERPRET the launcher asks for the same values multiplied in fp32. Never set on GPU.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def safe_max(m):
    """The max to subtract: 0 where ``m`` is -inf, so exp(-inf - 0) = 0 rather than NaN."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def softmax_block_update(m_i, l_i, acc, s, v, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one KV block into a softmax state (the online-softmax step).

    m_i [M] running max, l_i [M] running sum, acc [M, Dv] fp32 running sum of p*v,
    s [M, N] the block's logits, -inf where invisible, v [N, Dv] the block's values.
    A wholly invisible block (or row) leaves the state unchanged.
    """
    m_new = tl.maximum(m_i, row_max(s))
    m_sub = safe_max(m_new)
    alpha = exp(m_i - m_sub)  # [M]; 0 when m_i = -inf
    p = exp(s - m_sub[:, None])  # [M, N]; 0 where invisible
    l_i = l_i * alpha + row_sum(p)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST)  # p rounded to v's dtype
    return m_new, l_i, acc


@triton.jit
def state_merge(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """Merge two softmax states: m [M], l [M], acc [M, D]. -inf-safe."""
    m = tl.maximum(m_a, m_b)
    m_sub = safe_max(m)
    wa = exp(m_a - m_sub)
    wb = exp(m_b - m_sub)
    return m, l_a * wa + l_b * wb, acc_a * wa[:, None] + acc_b * wb[:, None]


@triton.jit
def state_finalize(m, l, acc):
    """State -> (o [M, D] = acc / l, 0 on empty rows; lse [M] natural log, -inf on empty rows)."""
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    lse = tl.where(empty, NEG_INF, safe_max(m) + tl.log2(l_safe) * LN2)
    o = acc / l_safe[:, None]
    return o, lse


@triton.jit
def attention_split_kernel(
    q_ptr,  # [B, Hq, Lq, Dk] float, any strides
    k_ptr,  # [B, Hkv, S, Dk] same dtype, any strides
    v_ptr,  # [B, Hkv, S, Dv] same dtype, any strides
    pos_q_ptr,  # [B, Lq] int: global position of each query
    pos_kv_ptr,  # [B, S] int: global position of each slot, < 0 = empty slot
    mask_ptr,  # [B, Lq, S] uint8 (MASK_KIND 1, nonzero = visible) / float bias (MASK_KIND 2) / unused (0)
    filled_ptr,  # [B] int: slots >= filled[b] of row b are empty and never read (HAS_FILLED), else unused
    o_ptr,  # [splits, B, Hq, Lq, Dv] fp32 per-split acc (WRITE_STATE), or the final o [B, Hq, Lq, Dv]
    lse_ptr,  # [splits, B, Hq, Lq] fp32 per-split max m (WRITE_STATE), or the final lse (natural log)
    l_ptr,  # [splits, B, Hq, Lq] fp32 per-split sum l (WRITE_STATE; same strides as lse_ptr), else unused
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pqb, stride_pqt,
    stride_pkb, stride_pks,
    stride_mb, stride_mt, stride_ms,
    stride_fb,
    stride_osplit, stride_ob, stride_oh, stride_ot, stride_od,
    stride_lsplit, stride_lb, stride_lh, stride_lt,
    Hkv, Lq, S, Dk, Dv,
    G,  # query heads per KV head (Hq // Hkv)
    scale, softcap, window,  # window 0 = none; softcap used only if SOFTCAP
    blocks_per_split,  # KV blocks of BLOCK_N slots per split (of all S slots; unused if HAS_FILLED)
    BLOCK_M: tl.constexpr,  # query rows per program (row = g * Lq + t), pow2 >= 16
    BLOCK_N: tl.constexpr,  # KV slots per block
    BLOCK_DK: tl.constexpr,  # main part of Dk: the largest pow2 <= Dk (16 if Dk < 16)
    BLOCK_DT: tl.constexpr,  # tail of Dk past BLOCK_DK, padded to pow2 >= 16; 0 = no tail (Dk a pow2 or <= 16)
    BLOCK_DV: tl.constexpr,  # Dv padded to pow2 >= 16
    V_FROM_K: tl.constexpr,  # v is k's first Dv columns (same storage and strides) and BLOCK_DV == BLOCK_DK
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool, 2 additive
    HAS_FILLED: tl.constexpr,  # filled_ptr is given: only the first filled[b] slots are live
    SOFTCAP: tl.constexpr,  # softcap > 0
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), else ignored
    UPCAST: tl.constexpr,  # interpreter-only bf16 workaround, see mma()
    WRITE_STATE: tl.constexpr,  # splits > 1: store the raw state (m, l, acc) for merge_states_kernel
):
    """One program: one (batch, KV head), one KV split, BLOCK_M of the G*Lq query rows.

    Each K/V block is loaded once and used by all G query heads of the group (GQA without
    repeat_kv) and all query tokens: the G*Lq (head, token) pairs are the M dimension.

    With HAS_FILLED the grid is still the one sized for S (no host sync on filled, so CUDA
    graphs replay it), but the KV range is only the live prefix [0, filled[b]): its blocks
    are spread evenly over the splits, so a short context still keeps every split busy.
    A split that starts past the prefix runs no iteration and writes the empty state
    (m = -inf, l = 0, acc = 0), which the split merge weighs 0; with one split that is
    o = 0, lse = -inf, as for any row with nothing visible.

    Dk that is not a power of two is not padded to the next one: it is a main part of
    BLOCK_DK columns and a tail of BLOCK_DT (MLA: 576 = 512 latent + 64 rope), two tl.dot
    into the same logits tile, as FlashMLA splits its nope and rope parts. With V_FROM_K
    (MLA's joint latent cache, v = kv[..., :Dv]) the main K tile, transposed, is the V tile:
    each slot is loaded once for both products.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    pid_m = tl.program_id(2)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [M]
    row_ok = rows < G * Lq
    t = rows % Lq  # query token
    h = hkv * G + rows // Lq  # query head
    dk = tl.arange(0, BLOCK_DK)  # K columns of the main part
    dv = tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt  # [M, 1]
    q = tl.load(q_rows + dk[None, :] * stride_qd, mask=row_ok[:, None] & (dk[None, :] < Dk), other=0.0)  # [M, DK]
    if BLOCK_DT > 0:
        dt = BLOCK_DK + tl.arange(0, BLOCK_DT)  # K columns of the tail: [BLOCK_DK, Dk)
        q_tail = tl.load(q_rows + dt[None, :] * stride_qd, mask=row_ok[:, None] & (dt[None, :] < Dk), other=0.0)  # [M, DT]
    pq = tl.load(pos_q_ptr + b * stride_pqb + t * stride_pqt, mask=row_ok, other=-1)  # [M]; -1 sees nothing

    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)

    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    if HAS_FILLED:
        n_live = tl.load(filled_ptr + b * stride_fb).to(tl.int64)
        n_live = tl.minimum(tl.maximum(n_live, 0), S)  # clamped to [0, S]
        live_blocks = (n_live + BLOCK_N - 1) // BLOCK_N
        split_blocks = (live_blocks + tl.num_programs(1) - 1) // tl.num_programs(1)
    else:
        n_live = S
        split_blocks = blocks_per_split
    n_start = split * split_blocks * BLOCK_N
    n_end = tl.minimum(n_start + split_blocks * BLOCK_N, n_live)  # past the end: no iteration
    for start in range(n_start, n_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [N]
        col_ok = cols < n_end
        k_cols = k_base + cols[None, :] * stride_ks  # [1, N]
        kt = tl.load(k_cols + dk[:, None] * stride_kd, mask=col_ok[None, :] & (dk[:, None] < Dk), other=0.0)  # [DK, N]
        if V_FROM_K:  # v's bytes are kt's first Dv rows; rows >= Dv reach only acc columns never stored
            v = tl.trans(kt)  # [N, DV]
        else:
            v = tl.load(  # [N, DV]
                v_base + cols[:, None] * stride_vs + dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (dv[None, :] < Dv), other=0.0,
            )
        pk = tl.load(pos_kv_ptr + b * stride_pkb + cols * stride_pks, mask=col_ok, other=-1)  # [N]

        s = mma(q, kt, DOT_PRECISION, UPCAST)  # [M, N]
        if BLOCK_DT > 0:
            kt_tail = tl.load(k_cols + dt[:, None] * stride_kd, mask=col_ok[None, :] & (dt[:, None] < Dk), other=0.0)  # [DT, N]
            s += mma(q_tail, kt_tail, DOT_PRECISION, UPCAST)
        s = s * scale  # natural-log units
        if SOFTCAP:
            s = softcap * tanh(s / softcap)
        visible = (pk[None, :] >= 0) & (pk[None, :] <= pq[:, None])
        visible = visible & ((window == 0) | (pq[:, None] - pk[None, :] < window))
        if MASK_KIND != 0:
            m_ptrs = mask_ptr + b * stride_mb + t[:, None] * stride_mt + cols[None, :] * stride_ms
            m_ok = row_ok[:, None] & col_ok[None, :]
            if MASK_KIND == 1:
                visible = visible & (tl.load(m_ptrs, mask=m_ok, other=0) != 0)
            else:
                s = s + tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
        s = tl.where(visible, s, NEG_INF)
        m_i, l_i, acc = softmax_block_update(m_i, l_i, acc, s, v, DOT_PRECISION, UPCAST)

    # Raw states (not o and lse) go to the split merge: an fp32 lse of ~1e4 would carry 1e-3
    # of rounding into the merge weights; separate (m, l) keep them exact.
    if WRITE_STATE:
        o, lse = acc, m_i
    else:
        o, lse = state_finalize(m_i, l_i, acc)
    o_ptrs = o_ptr + split * stride_osplit + b * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot
    tl.store(o_ptrs + dv[None, :] * stride_od, o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < Dv))
    row_off = split * stride_lsplit + b * stride_lb + h * stride_lh + t * stride_lt
    tl.store(lse_ptr + row_off, lse, mask=row_ok)
    if WRITE_STATE:
        tl.store(l_ptr + row_off, l_i, mask=row_ok)


@triton.jit
def merge_states_kernel(
    o_ptr,  # [R, B, H, L, D] float, any strides: normalised partials o_r, or raw acc_r (HAS_L)
    lse_ptr,  # [R, B, H, L] fp32: lse_r (natural log), or the raw max m_r (HAS_L)
    l_ptr,  # [R, B, H, L] fp32 raw sums l_r, same strides as lse_ptr (HAS_L), else unused
    out_o_ptr,  # [B, H, L, D]
    out_lse_ptr,  # [B, H, L] fp32, natural log
    stride_or, stride_ob, stride_oh, stride_ol, stride_od,
    stride_lr, stride_lb, stride_lh, stride_ll,
    stride_xb, stride_xh, stride_xl, stride_xd,
    stride_yb, stride_yh, stride_yl,
    R, H, L, D,
    num_rows,  # B * H * L
    BLOCK_ROWS: tl.constexpr,  # (b, h, l) rows per program
    BLOCK_D: tl.constexpr,  # D padded to pow2
    HAS_L: tl.constexpr,  # inputs are raw states (m, l, acc) from attention_split_kernel
):
    """One program: BLOCK_ROWS (b, h, l) rows, folding in the R partials as softmax states.

    A normalised partial (o_r, lse_r) is the state (m=lse_r, l=1, acc=o_r).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [ROWS]
    row_ok = rows < num_rows
    b = rows // (H * L)
    h = (rows // L) % H
    l = rows % L
    d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (d[None, :] < D)
    o_rows = o_ptr + b[:, None] * stride_ob + h[:, None] * stride_oh + l[:, None] * stride_ol + d[None, :] * stride_od
    lse_off = b * stride_lb + h * stride_lh + l * stride_ll  # [ROWS]

    m = tl.full([BLOCK_ROWS], NEG_INF, tl.float32)
    s = tl.full([BLOCK_ROWS], 0.0, tl.float32)
    acc = tl.full([BLOCK_ROWS, BLOCK_D], 0.0, tl.float32)
    l_r = tl.full([BLOCK_ROWS], 1.0, tl.float32)
    for r in range(R):
        lse_r = tl.load(lse_ptr + lse_off + r * stride_lr, mask=row_ok, other=NEG_INF)
        if HAS_L:
            l_r = tl.load(l_ptr + lse_off + r * stride_lr, mask=row_ok, other=0.0)
        o_r = tl.load(o_rows + r * stride_or, mask=ok, other=0.0).to(tl.float32)
        m, s, acc = state_merge(m, s, acc, lse_r, l_r, o_r)

    o, lse = state_finalize(m, s, acc)
    x_ptrs = out_o_ptr + b[:, None] * stride_xb + h[:, None] * stride_xh + l[:, None] * stride_xl + d[None, :] * stride_xd
    tl.store(x_ptrs, o.to(out_o_ptr.dtype.element_ty), mask=ok)
    tl.store(out_lse_ptr + b * stride_yb + h * stride_yh + l * stride_yl, lse, mask=row_ok)

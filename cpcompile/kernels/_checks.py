"""Shape/dtype/device validation shared by every implementation of the two ops.

Runs in the eager CPU path, the CUDA launcher and the fake (meta) impl, so bad inputs
fail at trace time too. Cheap: shapes, dtypes and devices only, never tensor data.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(int(s) if not isinstance(s, torch.SymInt) else s for s in t.shape)


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def check_attention_args(q, k, v, pos_q, pos_kv, scale, softcap, window, mask, filled=None) -> None:
    op = "attention_with_lse"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            _fail(op, f"{name} has shape {_shape(t)} (ndim {t.dim()}); expected a 4-d tensor "
                      f"q [B, Hq, Lq, Dk], k [B, Hkv, S, Dk], v [B, Hkv, S, Dv]")
    if q.dtype not in FLOAT_DTYPES:
        _fail(op, f"q has dtype {q.dtype}; expected one of float32, bfloat16, float16")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(op, f"{name} has dtype {t.dtype} but q has {q.dtype}; expected the same dtype")
    B, Hq, Lq, Dk = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != Dk:
        found = f"Dk={Dk}" if k.shape[0] == B else f"B={B}" if k.shape[3] == Dk else f"B={B}, Dk={Dk}"
        _fail(op, f"k has shape {_shape(k)} but q has {found}; expected k [B={B}, Hkv, S, Dk={Dk}]")
    if v.shape[0] != B or v.shape[1] != Hkv or v.shape[2] != S:
        _fail(op, f"v has shape {_shape(v)} but k has shape {_shape(k)}; "
                  f"expected v [B={B}, Hkv={Hkv}, S={S}, Dv]")
    if Hkv == 0 or Hq % Hkv != 0:
        _fail(op, f"q has Hq={Hq} heads and k has Hkv={Hkv}; expected Hkv >= 1 dividing Hq "
                  f"(query head h reads KV head h // (Hq // Hkv))")
    if pos_q.dim() != 2 or pos_q.shape[0] != B or pos_q.shape[1] != Lq:
        _fail(op, f"pos_q has shape {_shape(pos_q)}; expected pos_q [B={B}, Lq={Lq}]")
    if pos_kv.dim() != 2 or pos_kv.shape[0] != B or pos_kv.shape[1] != S:
        _fail(op, f"pos_kv has shape {_shape(pos_kv)}; expected pos_kv [B={B}, S={S}]")
    for name, t in (("pos_q", pos_q), ("pos_kv", pos_kv)):
        if not _is_int(t.dtype):
            _fail(op, f"{name} has dtype {t.dtype}; expected an integer dtype (global token positions)")
    if mask is not None:
        if mask.dim() != 3 or mask.shape[0] != B or mask.shape[1] != Lq or mask.shape[2] != S:
            _fail(op, f"mask has shape {_shape(mask)}; expected mask [B={B}, Lq={Lq}, S={S}]")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            _fail(op, f"mask has dtype {mask.dtype}; expected bool (True = visible) "
                      f"or a floating dtype (additive bias)")
    if filled is not None:
        if filled.dim() != 1 or filled.shape[0] != B:
            _fail(op, f"filled has shape {_shape(filled)}; expected filled [B={B}] "
                      f"(the number of filled KV slots of each row)")
        if not _is_int(filled.dtype):
            _fail(op, f"filled has dtype {filled.dtype}; expected an integer dtype "
                      f"(int32 or int64: slots s >= filled[b] of row b are empty)")
    named = [("k", k), ("v", v), ("pos_q", pos_q), ("pos_kv", pos_kv)]
    if mask is not None:
        named.append(("mask", mask))
    if filled is not None:  # a device tensor, not a host int: CUDA graphs replay it, no sync
        named.append(("filled", filled))
    for name, t in named:
        if t.device != q.device:
            _fail(op, f"{name} is on {t.device} but q is on {q.device}; expected one device")
    if not softcap >= 0:
        _fail(op, f"softcap={softcap}; expected softcap >= 0 (0 disables it)")
    if window < 0:
        _fail(op, f"window={window}; expected window >= 0 (0 disables it)")


def check_merge_args(o, lse) -> None:
    op = "merge_states"
    if o.dim() != 5:
        _fail(op, f"o has shape {_shape(o)} (ndim {o.dim()}); expected o [R, B, H, L, D]")
    if o.dtype not in FLOAT_DTYPES:
        _fail(op, f"o has dtype {o.dtype}; expected one of float32, bfloat16, float16")
    R, B, H, L, _ = o.shape
    if lse.dim() != 4 or tuple(lse.shape) != tuple(o.shape[:4]):
        _fail(op, f"lse has shape {_shape(lse)} but o has shape {_shape(o)}; "
                  f"expected lse [R={R}, B={B}, H={H}, L={L}]")
    if lse.dtype != torch.float32:
        _fail(op, f"lse has dtype {lse.dtype}; expected torch.float32 (natural-log LSE)")
    if R == 0:
        _fail(op, f"o has shape {_shape(o)} with R=0 partials; expected at least one partial")
    if lse.device != o.device:
        _fail(op, f"lse is on {lse.device} but o is on {o.device}; expected one device")

"""Shared helpers for the kernel tests: device, tolerances, input builders.

(Unique module name on purpose: tests/ has no __init__.py, so pytest puts this
directory on sys.path.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cpcompile.kernels.layout import slot_positions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances against the fp64 reference, per dtype of q/k/v (o is compared at these; lse
# is fp32 in every case and accumulated in fp32 from exactly representable inputs, so it
# gets the fp32 tolerance whatever the input dtype). bf16/fp16: one rounding of o to the
# output dtype (2^-8 / 2^-11 relative) plus the probabilities rounded to the input dtype
# before the P.V product on the GPU path (standard flash-attention practice).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}
LSE_TOL = dict(atol=1e-5, rtol=1e-5)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """Elementwise |a - e| <= atol + rtol*|e| in fp64, with -inf matching -inf exactly, and no NaN."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: NaN in output"
    inf = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], e[inf]), f"{what}: infinities differ"
    a, e = a[~inf], e[~inf]
    err = (a - e).abs() - (atol + rtol * e.abs())
    if err.numel() and err.max() > 0:
        i = int(err.argmax())
        raise AssertionError(
            f"{what}: max excess {float(err.max()):.3g} at flat {i}: got {float(a[i]):.8g}, "
            f"expected {float(e[i]):.8g} (atol={atol}, rtol={rtol})"
        )


def assert_attention_close(out, ref, dtype, what: str = "") -> None:
    (o, lse), (o_ref, lse_ref) = out, ref
    assert o.dtype == dtype, f"{what}: o dtype {o.dtype}, expected {dtype}"
    assert lse.dtype == torch.float32, f"{what}: lse dtype {lse.dtype}, expected float32"
    assert_close(lse, lse_ref, what=f"{what} lse", **LSE_TOL)
    assert_close(o, o_ref, what=f"{what} o", **TOL[dtype])


@dataclass
class Case:
    """One attention problem; ``args()`` gives the op's positional arguments."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos_q: torch.Tensor
    pos_kv: torch.Tensor
    scale: float
    softcap: float = 0.0
    window: int = 0
    mask: torch.Tensor | None = None
    filled: torch.Tensor | None = None  # [B] int: slots >= filled[b] of row b are empty

    def args(self):
        return (self.q, self.k, self.v, self.pos_q, self.pos_kv, self.scale, self.softcap, self.window, self.mask,
                self.filled)


def make_case(
    B=2, Hkv=2, G=2, Lq=1, S=40, Dk=16, Dv=16, dtype=torch.float32, *, seed=0,
    positions="decode", cp=1, cp_rank=0, kv_interleave=1, empty_slots=0,
    mask=None, softcap=0.0, window=0, strided=False, filled=None, device=DEVICE,
) -> Case:
    """Random q/k/v in ``dtype`` on ``device`` with consistent positions.

    positions: "decode" -- the Lq queries are the last Lq tokens of the sequence held by the
    slots; "chunked" -- the queries are an earlier chunk, so later slots are in the future;
    "random" -- arbitrary query positions. Slots are this CP rank's slots under the
    interleave rule; the last ``empty_slots`` are unwritten (pos -1). ``mask``: None,
    "bool" (left padding per row, plus random holes), "additive" (0 / finfo.min / -inf).
    ``strided``: k/v are slices of a larger cache buffer and q comes from a transpose.
    ``filled``: [B] live-slot counts (any int dtype, out-of-range values allowed); the slots
    past them are invisible to the additive mask's finfo.min rule as well.
    """
    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    written = max(S - empty_slots, 0)
    pos_kv = slot_positions(S, cp, cp_rank, kv_interleave)
    pos_kv[written:] = -1
    seq_len = int(pos_kv[:written].max()) + 1 if written else 0
    if positions == "decode":  # queries are the tail of the sequence (after the written KV)
        base = torch.full((B,), max(seq_len - Lq, 0))
    elif positions == "chunked":  # an earlier chunk: some slots are in the future
        base = torch.randint(0, max(seq_len, 1), (B,), generator=g)
    else:
        base = torch.randint(-2, max(seq_len, 1) + 2, (B,), generator=g)
    pos_q = base[:, None] + torch.arange(Lq)[None, :]  # [B, Lq]
    pos_kv = pos_kv[None, :].repeat(B, 1)  # [B, S]
    to = dict(dtype=dtype, device=device)
    if strided:  # views into a bigger cache (slice along S) and a transposed q
        k = torch.randn(B, Hkv, S + 7, Dk, generator=g).to(**to)[:, :, 3 : 3 + S]
        v = torch.randn(B, Hkv, S + 5, Dv, generator=g).to(**to)[:, :, 2 : 2 + S]
        q = torch.randn(B, Lq, Hq, Dk, generator=g).to(**to).transpose(1, 2)
    else:
        k = torch.randn(B, Hkv, S, Dk, generator=g).to(**to)
        v = torch.randn(B, Hkv, S, Dv, generator=g).to(**to)
        q = torch.randn(B, Hq, Lq, Dk, generator=g).to(**to)
    m = None
    if mask is not None:
        pad = torch.randint(0, max(seq_len // 2, 1), (B, 1, 1), generator=g)  # left padding per row
        holes = torch.rand(B, Lq, S, generator=g) < 0.1
        visible = (pos_kv[:, None, :] >= pad) & ~holes  # [B, Lq, S]
        if mask == "bool":
            m = visible
        else:
            # HF masks with finfo.min; a row whose every position-visible slot carries
            # finfo.min is precision-dependent (fp32 loses the logits next to 3.4e38), so
            # such rows get -inf instead and finfo.min is used where a real slot remains.
            pq, pk = pos_q[:, :, None], pos_kv[:, None, :]
            by_pos = (pk >= 0) & (pk <= pq) & ((pq - pk < window) if window > 0 else True)
            if filled is not None:  # a row whose live slots all carry finfo.min is just as ambiguous
                live = torch.arange(S)[None, :] < filled.cpu().clamp(0, S).long()[:, None]  # [B, S]
                by_pos = by_pos & live[:, None, :]
            row_ok = (by_pos & visible).any(-1, keepdim=True)  # [B, Lq, 1]
            hidden = torch.where(row_ok, torch.finfo(dtype).min, float("-inf"))
            bias = torch.where(visible, torch.randn(B, Lq, S, generator=g), hidden)
            m = bias.to(dtype)
    return Case(
        q, k, v, pos_q.to(device), pos_kv.to(device), 1.0 / math.sqrt(Dk), softcap, window,
        None if m is None else m.to(device), filled,
    )

"""attention_with_lse: the torch implementation and the Triton kernels vs the fp64 reference."""

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cpcompile  # noqa: F401  (registers the ops)
from cpcompile.kernels import triton_launch
from cpcompile.kernels.attention import attention_with_lse_torch
from cpcompile.kernels.reference import attention_with_lse_ref
from kernel_testing import DEVICE, LSE_TOL, TOL, Case, assert_attention_close, assert_close, make_case

# "torch": the pure-torch path; "triton": the launcher with its own heuristics (the real
# kernels on CUDA, the interpreter on CPU); "triton_tiled": forced small blocks, 3 KV
# splits and 16-row M tiles, so small shapes exercise the split merge and M tiling.
IMPLS = {
    "torch": attention_with_lse_torch,
    "triton": triton_launch.attention_with_lse,
    "triton_tiled": functools.partial(triton_launch.attention_with_lse, num_splits=3, block_n=16, block_m=16),
}


def run_and_check(impl, case, dtype, what=""):
    out = IMPLS[impl](*case.args())
    ref = attention_with_lse_ref(*case.args())
    assert_attention_close(out, ref, dtype, what=f"{impl} {what}")
    return out


@pytest.fixture(params=list(IMPLS), scope="module")
def impl(request):
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Dk,Dv", [(16, 16), (32, 16), (24, 40)])
def test_decode_gqa(impl, dtype, Dk, Dv):
    case = make_case(B=2, Hkv=2, G=4, Lq=1, S=150, Dk=Dk, Dv=Dv, dtype=dtype, empty_slots=20)
    run_and_check(impl, case, dtype)


@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_prefill_chunk_masks_softcap_window(impl, mask):
    case = make_case(B=3, Hkv=2, G=3, Lq=7, S=90, Dk=32, Dv=32, positions="chunked",
                     mask=mask, softcap=1.5, window=17, cp=2, cp_rank=1, kv_interleave=2, seed=3)
    run_and_check(impl, case, torch.float32)


def test_strided_views_of_cache(impl):
    case = make_case(B=2, Hkv=2, G=2, Lq=3, S=70, Dk=32, Dv=16, strided=True)
    assert not case.k.is_contiguous() and not case.q.is_contiguous()
    run_and_check(impl, case, torch.float32)


def test_op_dispatches_and_matches_reference():
    case = make_case(B=1, Hkv=1, G=8, Lq=2, S=33, Dk=64, Dv=64, mask="bool")
    out = torch.ops.cpcompile.attention_with_lse(*case.args())
    assert_attention_close(out, attention_with_lse_ref(*case.args()), torch.float32, "op")


# --- named edge cases -------------------------------------------------------------


def test_all_masked_rows(impl):
    case = make_case(B=2, Hkv=1, G=2, Lq=4, S=20, mask="bool")
    case.mask[0] = False  # batch row 0: nothing visible at all
    case.mask[1, 2] = False  # batch row 1: query 2 sees nothing
    o, lse = run_and_check(impl, case, torch.float32)
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[1, :, 2]).all()
    assert (o[0] == 0).all() and (o[1, :, 2] == 0).all()


def test_empty_cache_s0(impl):
    case = make_case(B=2, Hkv=2, G=2, Lq=3, S=0, Dk=16, Dv=8)
    o, lse = run_and_check(impl, case, torch.float32)
    assert o.shape == (2, 4, 3, 8) and (o == 0).all() and torch.isneginf(lse).all()


def test_all_slots_empty_or_future(impl):
    case = make_case(B=1, Hkv=1, G=1, Lq=2, S=50, empty_slots=50)  # every slot unwritten
    o, lse = run_and_check(impl, case, torch.float32)
    assert torch.isneginf(lse).all() and (o == 0).all()
    case = make_case(B=1, Hkv=1, G=1, Lq=2, S=50)
    case.pos_q[:] = -5  # queries before every slot
    o, lse = run_and_check(impl, case, torch.float32)
    assert torch.isneginf(lse).all() and (o == 0).all()


def test_more_queries_than_slots(impl):
    # Lq > S: a prefill chunk on a rank that holds few slots (cp=4: every 4th token).
    case = make_case(B=2, Hkv=1, G=2, Lq=16, S=5, positions="decode", cp=4, cp_rank=3)
    run_and_check(impl, case, torch.float32)


def test_large_logits_do_not_overflow(impl):
    # q.k = 1e4 + (small integer), scale 1: exp(1e4) overflows fp32 without max-subtraction,
    # and the O(1) differences between slots must survive (exact in fp32: small integers).
    g = torch.Generator().manual_seed(0)
    B, H, Lq, S, D = 1, 2, 3, 40, 16
    q = torch.zeros(B, H, Lq, D)
    q[..., 0], q[..., 1] = 100.0, torch.randint(1, 3, (B, H, Lq), generator=g).float()
    k = torch.zeros(B, H, S, D)
    k[..., 0], k[..., 1] = 100.0, torch.randint(-3, 4, (B, H, S), generator=g).float()
    v = torch.randn(B, H, S, 8, generator=g)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    pos_q, pos_kv = torch.full((B, Lq), S, device=DEVICE), torch.arange(S, device=DEVICE)[None]
    out = IMPLS[impl](q, k, v, pos_q, pos_kv, 1.0)
    ref = attention_with_lse_ref(q, k, v, pos_q, pos_kv, 1.0)
    assert ref[1].min() > 9.9e3
    assert_attention_close(out, ref, torch.float32, "large logits")
    assert_close(out[1] - 1e4, ref[1] - 1e4, what="lse - 1e4", atol=1e-3, rtol=0)  # fp32 ulp at 1e4 is 1e-3


# --- validation -------------------------------------------------------------------


def _good():
    return make_case(B=2, Hkv=2, G=2, Lq=3, S=10, Dk=32, Dv=16, mask="bool")


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda c: setattr(c, "k", torch.zeros(2, 3, 10, 64, device=DEVICE)),
         "k has shape (2, 3, 10, 64) but q has Dk=32; expected k [B=2, Hkv, S, Dk=32]"),
        (lambda c: setattr(c, "k", c.k[:1]), "k has shape (1, 2, 10, 32) but q has B=2; expected k [B=2, Hkv, S, Dk=32]"),
        (lambda c: setattr(c, "q", c.q[0]), "q has shape (4, 3, 32) (ndim 3)"),
        (lambda c: setattr(c, "v", c.v[:, :, :9]), "v has shape (2, 2, 9, 16) but k has shape (2, 2, 10, 32)"),
        (lambda c: setattr(c, "q", torch.zeros(2, 3, 3, 32, device=DEVICE)), "Hq=3 heads and k has Hkv=2"),
        (lambda c: setattr(c, "k", c.k.half()), "k has dtype torch.float16 but q has torch.float32"),
        (lambda c: setattr(c, "q", c.q.double()), "q has dtype torch.float64; expected one of"),
        (lambda c: setattr(c, "pos_q", c.pos_q.float()), "pos_q has dtype torch.float32; expected an integer dtype"),
        (lambda c: setattr(c, "pos_kv", c.pos_kv[:, :4]), "pos_kv has shape (2, 4); expected pos_kv [B=2, S=10]"),
        (lambda c: setattr(c, "pos_q", c.pos_q[:1]), "pos_q has shape (1, 3); expected pos_q [B=2, Lq=3]"),
        (lambda c: setattr(c, "mask", c.mask[:, None]), "mask has shape (2, 1, 3, 10); expected mask [B=2, Lq=3, S=10]"),
        (lambda c: setattr(c, "mask", c.mask.int()), "mask has dtype torch.int32; expected bool"),
        (lambda c: setattr(c, "softcap", -1.0), "softcap=-1.0; expected softcap >= 0"),
        (lambda c: setattr(c, "window", -2), "window=-2; expected window >= 0"),
        (lambda c: setattr(c, "filled", torch.tensor([3], device=DEVICE)),
         "filled has shape (1,); expected filled [B=2]"),
        (lambda c: setattr(c, "filled", torch.full((2, 1), 3, device=DEVICE)),
         "filled has shape (2, 1); expected filled [B=2]"),
        (lambda c: setattr(c, "filled", torch.full((2,), 3.0, device=DEVICE)),
         "filled has dtype torch.float32; expected an integer dtype"),
        (lambda c: setattr(c, "filled", torch.ones(2, dtype=torch.bool, device=DEVICE)),
         "filled has dtype torch.bool; expected an integer dtype"),
    ],
)
def test_bad_inputs_raise_valueerror(mutate, needle):
    c = _good()
    mutate(c)
    with pytest.raises(ValueError, match="^attention_with_lse: ") as e:
        torch.ops.cpcompile.attention_with_lse(*c.args())
    assert needle in str(e.value)
    with pytest.raises(ValueError, match="^attention_with_lse: ") as e:  # same check in the fake impl
        with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
            torch.ops.cpcompile.attention_with_lse(*c.args())
    assert needle in str(e.value)


def test_mixed_devices_raise_valueerror():
    c = _good()
    c.pos_kv = c.pos_kv.to("meta")
    with pytest.raises(ValueError, match="pos_kv is on meta but q is on"):
        torch.ops.cpcompile.attention_with_lse(*c.args())
    c = _good()
    c.filled = torch.full((2,), 4, device="meta")
    with pytest.raises(ValueError, match="filled is on meta but q is on"):
        torch.ops.cpcompile.attention_with_lse(*c.args())


# --- tracing ----------------------------------------------------------------------


def test_fake_tensor_shapes():
    c = make_case(B=2, Hkv=2, G=3, Lq=5, S=11, Dk=24, Dv=40, dtype=torch.bfloat16)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        o, lse = torch.ops.cpcompile.attention_with_lse(*c.args())
    assert o.shape == (2, 6, 5, 40) and o.dtype == torch.bfloat16
    assert lse.shape == (2, 6, 5) and lse.dtype == torch.float32
    c.filled = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        o, lse = torch.ops.cpcompile.attention_with_lse(*c.args())
    assert o.shape == (2, 6, 5, 40) and o.dtype == torch.bfloat16
    assert lse.shape == (2, 6, 5) and lse.dtype == torch.float32


def test_torch_compile_fullgraph():
    c = make_case(B=2, Hkv=2, G=2, Lq=2, S=30, Dk=16, Dv=16, mask="additive", softcap=3.0, window=12)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, pos_q, pos_kv, mask):
        o, lse = torch.ops.cpcompile.attention_with_lse(q, k, v, pos_q, pos_kv, c.scale, c.softcap, c.window, mask)
        return o * 2, lse

    o, lse = f(c.q, c.k, c.v, c.pos_q, c.pos_kv, c.mask)
    o_ref, lse_ref = attention_with_lse_ref(*c.args())
    assert_close(o, 2 * o_ref, what="compiled o", **TOL[torch.float32])
    assert_close(lse, lse_ref, what="compiled lse", **TOL[torch.float32])


def test_opcheck():
    c = make_case(B=2, Hkv=2, G=2, Lq=2, S=30, Dk=16, Dv=8, mask="bool", softcap=3.0, window=12)
    torch.library.opcheck(torch.ops.cpcompile.attention_with_lse.default, c.args(),
                          test_utils=("test_schema", "test_faketensor"))
    c.filled = torch.tensor([17, 30], device=DEVICE)
    torch.library.opcheck(torch.ops.cpcompile.attention_with_lse.default, c.args(),
                          test_utils=("test_schema", "test_faketensor"))


# --- properties vs the fp64 reference ---------------------------------------------------


@st.composite
def cases(draw):
    """Shapes, positions and options over the ranges the ops must handle."""
    S = draw(st.one_of(st.just(0), st.integers(1, 15), st.integers(16, 130), st.integers(131, 600)))
    cp = draw(st.integers(1, 4))
    params = dict(
        B=draw(st.integers(1, 4)), Hkv=draw(st.integers(1, 4)), G=draw(st.integers(1, 8)),
        Lq=draw(st.integers(1, 16)), S=S,
        **dict(zip(("Dk", "Dv"), draw(st.sampled_from([(16, 16), (32, 16), (24, 40), (64, 64), (8, 72)])))),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        positions=draw(st.sampled_from(["decode", "chunked", "random"])),
        cp=cp, cp_rank=draw(st.integers(0, cp - 1)), kv_interleave=draw(st.integers(1, 3)),
        empty_slots=draw(st.integers(0, S // 3)),
        mask=draw(st.sampled_from([None, "bool", "additive"])),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.7, 50.0])),
        window=draw(st.sampled_from([0, 0, 1, 5, 64])),
        strided=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )
    return params


@given(params=cases())
def test_torch_matches_reference(params):
    case = make_case(**params)
    run_and_check("torch", case, params["dtype"], what=str(params))


@given(params=cases(), tiling=st.sampled_from(["default", "forced"]), splits=st.integers(2, 5))
def test_triton_matches_reference(params, tiling, splits):
    case = make_case(**params)
    p = params
    # Forced small tiles and several splits, when the interpreter can afford the iterations.
    iters = p["B"] * p["Hkv"] * math.ceil(p["G"] * p["Lq"] / 16) * math.ceil(p["S"] / 32)
    kw = dict(num_splits=splits, block_n=32, block_m=16) if tiling == "forced" and iters <= 200 else {}
    out = triton_launch.attention_with_lse(*case.args(), **kw)
    assert_attention_close(out, attention_with_lse_ref(*case.args()), p["dtype"], what=f"triton {kw} {p}")


# --- filled: slots past filled[b] are empty and never read -------------------------------


@st.composite
def filled_rows(draw, B, S):
    """[B] filled counts: 0, S, a partial count, or out of range (clamped), one per row or shared."""
    value = st.one_of(st.just(0), st.just(S), st.integers(0, S), st.sampled_from([-3, S + 5]))
    rows = [draw(value)] * B if draw(st.booleans()) else [draw(value) for _ in range(B)]
    return torch.tensor(rows, dtype=draw(st.sampled_from([torch.int32, torch.int64])), device=DEVICE)


@given(params=cases(), data=st.data())
def test_torch_filled_matches_reference(params, data):
    case = make_case(**params, filled=data.draw(filled_rows(params["B"], params["S"]), label="filled"))
    run_and_check("torch", case, params["dtype"], what=f"filled={case.filled.tolist()} {params}")


@given(params=cases(), data=st.data(), splits=st.integers(2, 5))
def test_triton_filled_matches_reference(params, data, splits):
    case = make_case(**params, filled=data.draw(filled_rows(params["B"], params["S"]), label="filled"))
    p = params
    # Forced tiles and splits when the interpreter can afford them: splits past the live
    # prefix write the empty state and must merge to exactly nothing.
    iters = p["B"] * p["Hkv"] * math.ceil(p["G"] * p["Lq"] / 16) * math.ceil(p["S"] / 32)
    kw = dict(num_splits=splits, block_n=32, block_m=16) if iters <= 200 else {}
    out = triton_launch.attention_with_lse(*case.args(), **kw)
    assert_attention_close(out, attention_with_lse_ref(*case.args()), p["dtype"],
                           what=f"triton {kw} filled={case.filled.tolist()} {p}")


def test_filled_edge_values(impl):
    # One row each: nothing filled, one slot, all but the last, all, and out of range both ways.
    # triton_tiled: 150 slots = 10 blocks over 3 splits; filled=1 leaves 2 splits empty.
    case = make_case(B=6, Hkv=2, G=2, Lq=2, S=150, positions="chunked", mask="bool", seed=5)
    case.filled = torch.tensor([0, 1, 149, 150, -7, 400], device=DEVICE)
    o, lse = run_and_check(impl, case, torch.float32, what="edge filled")
    assert torch.isneginf(lse[0]).all() and (o[0] == 0).all()
    assert torch.isneginf(lse[4]).all() and (o[4] == 0).all()  # -7 is clamped to 0
    case.filled = torch.tensor([0, 1, 149, 150, 0, 150], device=DEVICE)  # clamped by hand, and 150 = S
    assert_attention_close((o, lse), attention_with_lse_ref(*case.args()), torch.float32, "clamped")
    case.filled = None
    assert_attention_close((o[5:], lse[5:]), [x[5:] for x in attention_with_lse_ref(*case.args())],
                           torch.float32, "filled >= S is all slots")


@pytest.mark.parametrize("mask,dtype", [(None, torch.bfloat16), ("bool", torch.float32), ("additive", torch.float32)])
def test_filled_never_reads_past_the_prefix(impl, mask, dtype):
    # Past filled[b]: NaN in K and V, positions that would be visible, NaN bias / True mask.
    # The result must be finite and equal to running each row on its prefix alone.
    B, S = 4, 130
    case = make_case(B=B, Hkv=2, G=2, Lq=2, S=S, Dk=32, Dv=16, dtype=dtype, positions="random", seed=7,
                     mask=None if mask is None else "bool", softcap=2.0)
    if mask == "additive":
        case.mask = torch.randn(B, 2, S, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    filled = [0, 45, 130, 97]
    case.filled = torch.tensor(filled, dtype=torch.int32, device=DEVICE)
    for b, n in enumerate(filled):
        case.k[b, :, n:] = float("nan")
        case.v[b, :, n:] = float("nan")
        case.pos_kv[b, n:] = torch.randint(-2, int(case.pos_q[b].max()) + 1, (S - n,)).to(DEVICE)
        if mask == "bool":
            case.mask[b, :, n:] = True
        elif mask == "additive":
            case.mask[b, :, n:] = float("nan")
    o, lse = IMPLS[impl](*case.args())
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    for b, n in enumerate(filled):
        row = Case(case.q[b:b + 1], case.k[b:b + 1, :, :n], case.v[b:b + 1, :, :n], case.pos_q[b:b + 1],
                   case.pos_kv[b:b + 1, :n], case.scale, case.softcap,
                   mask=None if mask is None else case.mask[b:b + 1, :, :n])  # row b, its first n slots
        o_row, lse_row = IMPLS[impl](*row.args())
        assert_close(lse[b], lse_row[0], what=f"{impl} row {b} lse", **LSE_TOL)
        assert_close(o[b], o_row[0], what=f"{impl} row {b} o", **TOL[dtype])


def test_torch_path_cost_follows_filled():
    # The torch path's matmul FLOPs on an S-slot cache with filled = n are those of an n-slot
    # cache: the empty tail costs nothing.
    from torch.utils.flop_counter import FlopCounterMode

    def flops(case):
        with FlopCounterMode(display=False) as counter:
            attention_with_lse_torch(*case.args())
        return counter.get_total_flops()

    full = make_case(B=2, Hkv=2, G=4, Lq=1, S=4096, Dk=64, Dv=64, device="cpu")
    prefix = make_case(B=2, Hkv=2, G=4, Lq=1, S=40, Dk=64, Dv=64, device="cpu")
    full.filled = torch.tensor([40, 13])
    assert flops(full) == flops(prefix) == 2 * 2 * 2 * 40 * 4 * (64 + 64)  # B*Hkv * 2*n*G*(Dk+Dv)


def test_filled_changes_do_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    c = make_case(B=2, Hkv=2, G=2, Lq=1, S=64, Dk=16, Dv=16)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def f(q, k, v, pos_q, pos_kv, filled):
        return torch.ops.cpcompile.attention_with_lse(q, k, v, pos_q, pos_kv, c.scale, 0.0, 0, None, filled)

    for filled in ([64, 64], [5, 0], [33, 64]):
        c.filled = torch.tensor(filled, device=DEVICE)
        o, lse = f(c.q, c.k, c.v, c.pos_q, c.pos_kv, c.filled)
        assert_attention_close((o, lse), attention_with_lse_ref(*c.args()), torch.float32, f"compiled {filled}")
    assert counter.frame_count == 1


# --- MLA: 128 query heads on one KV head, Dk = main + tail, v a view of k ----------------
# DeepSeek's absorbed attention reads one joint latent cache kv [B, 1, S, 512 + 64]: k = kv,
# v = kv[..., :512]. The kernel splits Dk into a power-of-two main part and a tail (two dots
# into one logits tile) and, when v is k's prefix and fits the main tile, uses that tile as V.
# Small dims keep the interpreter fast: Dk = 16 + 8 (tail; V from K's tile, BLOCK_DV ==
# BLOCK_DK == 16) and Dk = 32 + 8 (tail; v aliases k but BLOCK_DV 16 != 32: loaded again).


def mla_case(Dk, Dv, G, Lq, S, dtype, filled, seed=0):
    c = make_case(B=2, Hkv=1, G=G, Lq=Lq, S=S, Dk=Dk, Dv=Dv, dtype=dtype, seed=seed)  # Lq > 1: causal chunk
    c.v = c.k[..., :Dv]  # the joint cache: same storage and strides as k
    c.filled = torch.tensor(filled, device=DEVICE)
    return c


@pytest.mark.parametrize("Dk,Dv,G,Lq,dtype", [
    (24, 16, 8, 1, torch.float32),
    (24, 16, 16, 3, torch.bfloat16),
    (40, 16, 16, 1, torch.bfloat16),
    (40, 16, 8, 5, torch.float32),
])
def test_mla_small_dims(Dk, Dv, G, Lq, dtype):
    case = mla_case(Dk, Dv, G, Lq, S=70, dtype=dtype, filled=[61, 23], seed=Dk + Lq)
    ref = attention_with_lse_ref(*case.args())
    assert_attention_close(attention_with_lse_torch(*case.args()), ref, dtype, "torch")
    for splits in (1, 3):  # 16-slot blocks: 5 live blocks in row 0, 2 in row 1 (one split left empty)
        out = triton_launch.attention_with_lse(*case.args(), num_splits=splits, block_n=16, block_m=16)
        assert_attention_close(out, ref, dtype, f"triton splits={splits}")


@pytest.mark.parametrize("Lq,dtype", [(1, torch.bfloat16), (3, torch.float32)])
def test_mla_real_dims_tiny_cache(Lq, dtype):
    # Dk = 576 = 512 + 64 (the tail path at its real width), Dv = 512 from K's tile; S = 40.
    case = mla_case(576, 512, G=4, Lq=Lq, S=40, dtype=dtype, filled=[40, 29])
    ref = attention_with_lse_ref(*case.args())
    for splits in (1, 2):
        out = triton_launch.attention_with_lse(*case.args(), num_splits=splits, block_n=16)
        assert_attention_close(out, ref, dtype, f"triton splits={splits}")


def test_mla_split_head_dim_and_blocks():
    # Never wider than the next power of two; tail 0 for powers of two and Dk <= 16.
    assert [triton_launch.split_head_dim(d) for d in (576, 192, 40, 24, 17, 128, 16, 8)] == [
        (512, 64), (128, 64), (32, 16), (16, 16), (16, 16), (128, 0), (16, 0), (16, 0)]
    Blocks = triton_launch.Blocks
    # GPU tiles: MLA decode (128 rows), then the generic shapes as before the tail existed.
    assert triton_launch.choose_blocks(576, 512, 128, interpreted=False) == Blocks(64, 32, 512, 64, 512, 8, 2)
    assert triton_launch.choose_blocks(128, 128, 4, interpreted=False) == Blocks(16, 64, 128, 0, 128, 4, 3)
    assert triton_launch.choose_blocks(256, 256, 64, interpreted=False) == Blocks(64, 32, 256, 0, 256, 4, 3)
    assert triton_launch.choose_blocks(192, 128, 16, interpreted=False) == Blocks(16, 32, 128, 64, 128, 4, 3)


class _RecordLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records (grid, kwargs)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


def test_mla_v_from_k_is_chosen_at_launch(monkeypatch):
    kernel = _RecordLaunch()
    monkeypatch.setattr(triton_launch, "_tk", SimpleNamespace(attention_split_kernel=kernel))
    monkeypatch.setattr(triton_launch, "_interpreted", lambda: False)  # the GPU's tiles
    kv = torch.zeros(2, 1, 64, 576, dtype=torch.bfloat16, device=DEVICE)
    q = torch.zeros(2, 128, 1, 576, dtype=torch.bfloat16, device=DEVICE)
    pos_q, pos_kv = torch.full((2, 1), 64, device=DEVICE), torch.arange(64, device=DEVICE).expand(2, 64)
    for v, from_k in [(kv[..., :512], True), (kv[..., :512].clone(), False), (kv[..., 64:], False)]:
        assert triton_launch.v_is_k_prefix(kv, v) == from_k
        triton_launch.attention_with_lse(q, kv, v, pos_q, pos_kv, 0.1, num_splits=1)
        grid, kw = kernel.launches.pop()
        assert grid == (2, 1, 2)  # (B * Hkv, splits, 128 rows / 64)
        assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_DK"], kw["BLOCK_DT"], kw["BLOCK_DV"]) == (64, 32, 512, 64, 512)
        assert (kw["num_warps"], kw["num_stages"], kw["V_FROM_K"]) == (8, 2, from_k)


def test_mla_split_count_bounds_state_traffic():
    # MLA decode, B=1, S=32K on 132 SMs: 2 programs per split would ask for 256 splits, whose
    # fp32 states (128 rows x 514 floats, written and read) would be 3.6x the 37.7 MB of KV.
    kv_bytes, rows, Dv = 32768 * 576 * 2, 128, 512
    cap = triton_launch.state_split_cap(kv_bytes, rows, Dv)
    splits = triton_launch.choose_num_splits(32768 // 32, 2, 132, cap)
    assert splits == 17 and splits * rows * (Dv + 2) * 8 <= 0.25 * kv_bytes
    # GQA decode at D=128 (the shapes of the heuristic test below): the cap never binds.
    for B, Hq, S in [(1, 32, 4096), (1, 64, 131072), (8, 32, 32768), (32, 64, 131072)]:
        cap = triton_launch.state_split_cap(B * 8 * S * 256 * 2, B * Hq, 128)
        blocks = S // 64
        assert triton_launch.choose_num_splits(blocks, B * 8, 132, cap) == triton_launch.choose_num_splits(blocks, B * 8, 132)


# --- launcher details -------------------------------------------------------------------


def test_split_heuristic_fills_an_h100_for_decode():
    # Decode, D=128 (64-slot blocks), 132 SMs: enough programs for >= 2 waves and >= 2
    # blocks per split, never more splits than blocks allow.
    sms = 132
    for B, Hkv, S in [(1, 8, 4096), (1, 8, 131072), (8, 8, 32768), (32, 8, 131072), (1, 1, 128)]:
        blocks = math.ceil(S / 64)
        splits = triton_launch.choose_num_splits(blocks, B * Hkv, sms)
        assert 1 <= splits <= blocks // 2 or blocks < 2
        if blocks >= 2 * 2 * sms:  # long shards: the GPU is filled
            assert B * Hkv * splits >= 2 * sms, (B, Hkv, S, splits)
    assert triton_launch.choose_num_splits(0, 8, sms) == 1
    assert triton_launch.choose_num_splits(1000, 4096, sms) == 1  # plenty of programs already


def test_cuda_kernel_body_runs_the_triton_launcher():
    # The function registered for CUDA, called on this device's tensors (interpreter on CPU).
    from cpcompile.kernels.attention import attention_with_lse_cuda
    from cpcompile.kernels.merge import merge_states_cuda

    case = make_case(B=2, Hkv=2, G=2, Lq=2, S=50, mask="bool")
    out = attention_with_lse_cuda(*case.args())
    assert_attention_close(out, attention_with_lse_ref(*case.args()), torch.float32, "cuda body")
    o, lse = torch.stack([out[0], out[0]]), torch.stack([out[1], out[1]])
    om, lm = merge_states_cuda(o, lse)
    assert_close(om, out[0], what="merge o", **TOL[torch.float32])
    assert_close(lm, out[1] + math.log(2), what="merge lse", **TOL[torch.float32])


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_launch, "_tk", None)
    monkeypatch.setattr(triton_launch, "_TRITON_IMPORT_ERROR", ImportError("No module named 'triton'"), raising=False)
    case = make_case(S=4)
    with pytest.raises(RuntimeError, match="attention_with_lse: the CUDA path needs Triton"):
        triton_launch.attention_with_lse(*case.args())
    # The CPU path does not need Triton.
    assert_attention_close(attention_with_lse_torch(*case.args()), attention_with_lse_ref(*case.args()),
                           torch.float32, "torch")

"""attention_with_lse: the torch implementation and the Triton kernels vs the fp64 reference."""

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cpcompile  # noqa: F401  (registers the ops)
from cpcompile.kernels import triton_launch
from cpcompile.kernels.attention import attention_with_lse_torch
from cpcompile.kernels.reference import attention_with_lse_ref
from kernel_testing import DEVICE, TOL, assert_attention_close, assert_close, make_case

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
         "k has shape (2, 3, 10, 64) but q has B=2, Dk=32; expected k [B=2, Hkv, S, Dk=32]"),
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


# --- tracing ----------------------------------------------------------------------


def test_fake_tensor_shapes():
    c = make_case(B=2, Hkv=2, G=3, Lq=5, S=11, Dk=24, Dv=40, dtype=torch.bfloat16)
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

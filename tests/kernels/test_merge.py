"""merge_states: the torch implementation and the Triton kernel vs the fp64 reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cpcompile  # noqa: F401  (registers the ops)
from cpcompile.kernels import triton_launch
from cpcompile.kernels.merge import merge_states_torch
from cpcompile.kernels.reference import merge_states_ref
from kernel_testing import DEVICE, LSE_TOL, TOL, assert_close

IMPLS = {"torch": merge_states_torch, "triton": triton_launch.merge_states}
NEG_INF = float("-inf")


@pytest.fixture(params=list(IMPLS), scope="module")
def impl(request):
    return request.param


def make_partials(R, B, H, L, D, dtype=torch.float32, seed=0, p_empty=0.2, lse_scale=5.0):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(R, B, H, L, D, generator=g).to(dtype)
    lse = torch.randn(R, B, H, L, generator=g) * lse_scale
    lse[torch.rand(R, B, H, L, generator=g) < p_empty] = NEG_INF
    return o.to(DEVICE), lse.to(DEVICE)


def check(impl, o, lse):
    om, lm = IMPLS[impl](o, lse)
    om_ref, lm_ref = merge_states_ref(o, lse)
    assert om.dtype == o.dtype and lm.dtype == torch.float32
    assert_close(lm, lm_ref, what=f"{impl} lse", **LSE_TOL)
    assert_close(om, om_ref, what=f"{impl} o", **TOL[o.dtype])
    return om, lm


@given(
    R=st.integers(1, 6), B=st.integers(1, 3), H=st.integers(1, 5), L=st.integers(1, 4),
    D=st.sampled_from([1, 8, 24, 64, 100]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    p_empty=st.sampled_from([0.0, 0.3, 0.9]), seed=st.integers(0, 2**16),
)
def test_merge_matches_reference(impl, R, B, H, L, D, dtype, p_empty, seed):
    check(impl, *make_partials(R, B, H, L, D, dtype, seed, p_empty))


def test_neg_inf_partials(impl):
    o, lse = make_partials(3, 2, 2, 2, 16, p_empty=0.0)
    lse[:, 0] = NEG_INF  # batch row 0: every partial empty
    lse[1:, 1] = NEG_INF  # batch row 1: only partial 0 counts
    o[1:, 1] = 1e30  # garbage in empty partials must not leak
    om, lm = check(impl, o, lse)
    assert (om[0] == 0).all() and torch.isneginf(lm[0]).all()
    assert_close(lm[1], lse[0, 1], what="lse of the one live partial", **LSE_TOL)


def test_large_lse_no_overflow(impl):
    o, lse = make_partials(4, 1, 2, 3, 8, p_empty=0.0)
    lse = lse + 1e4  # exp(lse) would overflow fp32; differences stay small
    check(impl, o, lse)


def test_single_partial_is_identity(impl):
    o, lse = make_partials(1, 2, 3, 4, 32)
    om, lm = check(impl, o, lse)
    finite = torch.isfinite(lse[0])
    assert_close(lm, lse[0], what="lse", **LSE_TOL)
    assert_close(om[finite], o[0][finite], what="o", **TOL[o.dtype])
    assert (om[~finite] == 0).all()


@pytest.mark.parametrize(
    "o_shape,lse_shape,lse_dtype,needle",
    [
        ((2, 1, 2, 3), (2, 1, 2, 3), torch.float32, "o has shape (2, 1, 2, 3) (ndim 4); expected o [R, B, H, L, D]"),
        ((2, 1, 2, 3, 8), (2, 1, 2, 4), torch.float32, "lse has shape (2, 1, 2, 4) but o has shape (2, 1, 2, 3, 8); expected lse [R=2, B=1, H=2, L=3]"),
        ((2, 1, 2, 3, 8), (2, 1, 2, 3), torch.bfloat16, "lse has dtype torch.bfloat16; expected torch.float32"),
        ((0, 1, 2, 3, 8), (0, 1, 2, 3), torch.float32, "R=0 partials"),
    ],
)
def test_bad_inputs_raise_valueerror(o_shape, lse_shape, lse_dtype, needle):
    o, lse = torch.zeros(o_shape, device=DEVICE), torch.zeros(lse_shape, dtype=lse_dtype, device=DEVICE)
    with pytest.raises(ValueError, match="^merge_states: ") as e:
        torch.ops.cpcompile.merge_states(o, lse)
    assert needle in str(e.value)
    with pytest.raises(ValueError, match="^merge_states: ") as e:
        with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
            torch.ops.cpcompile.merge_states(o, lse)
    assert needle in str(e.value)


def test_int_o_raises():
    with pytest.raises(ValueError, match="o has dtype torch.int64"):
        torch.ops.cpcompile.merge_states(torch.zeros(1, 1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1))


def test_opcheck_and_compile_fullgraph():
    o, lse = make_partials(3, 2, 4, 2, 16)
    torch.library.opcheck(torch.ops.cpcompile.merge_states.default, (o, lse), test_utils=("test_schema", "test_faketensor"))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(o, lse):
        om, lm = torch.ops.cpcompile.merge_states(o, lse)
        return om + 1, lm

    om, lm = f(o, lse)
    om_ref, lm_ref = merge_states_ref(o, lse)
    assert_close(om, om_ref + 1, what="compiled o", **TOL[torch.float32])
    assert_close(lm, lm_ref, what="compiled lse", **LSE_TOL)

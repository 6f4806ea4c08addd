"""The identity the project rests on: attention over CP shards, merged by LSE, equals
attention over the whole sequence.

One sequence's KV is split over R ranks by the interleave rule (``layout``); each rank
attends every query to its own slots (static buffers, so unwritten slots are empty and
some ranks may hold nothing a query can see, or nothing at all), and merge_states
combines the R partials.
"""

import functools

import torch
from hypothesis import given
from hypothesis import strategies as st

import cpcompile  # noqa: F401  (registers the ops)
from cpcompile.kernels import triton_launch
from cpcompile.kernels.attention import attention_with_lse_torch
from cpcompile.kernels.layout import slot_positions
from cpcompile.kernels.merge import merge_states_torch
from cpcompile.kernels.reference import attention_with_lse_ref, merge_states_ref
from kernel_testing import DEVICE, TOL, assert_attention_close, assert_close, make_case

PATHS = {  # (attention, merge) per implementation
    "reference": (attention_with_lse_ref, merge_states_ref),
    "torch": (attention_with_lse_torch, merge_states_torch),
    "triton": (functools.partial(triton_launch.attention_with_lse, block_n=16, block_m=16), triton_launch.merge_states),
}


def shard(case, cp, kv_interleave):
    """Split the case's whole-sequence KV (slot s = position s) into cp rank-local caches."""
    T = case.k.shape[2]
    num_slots = -(-T // (cp * kv_interleave)) * kv_interleave  # static per-rank buffer
    for r in range(cp):
        pos = slot_positions(num_slots, cp, r, kv_interleave).to(DEVICE)  # [num_slots]
        written = pos < T
        src = torch.where(written, pos, 0)  # empty slots get slot 0's data, but position -1
        pos_kv = torch.where(written, pos, -1)[None].expand(case.k.shape[0], -1)
        mask = None if case.mask is None else case.mask[..., src]
        yield (case.q, case.k[:, :, src], case.v[:, :, src], case.pos_q, pos_kv.contiguous(),
               case.scale, case.softcap, case.window, mask)


def sharded_attention(path, case, cp, kv_interleave, extra_empty=0):
    attention, merge = PATHS[path]
    outs = [attention(*args) for args in shard(case, cp, kv_interleave)]
    for _ in range(extra_empty):  # ranks whose cache holds no token yet
        q = case.q
        B, Hq, Lq, _ = q.shape
        empty = (torch.zeros(B, Hq, Lq, case.v.shape[3], dtype=outs[0][0].dtype, device=DEVICE),
                 torch.full((B, Hq, Lq), float("-inf"), dtype=outs[0][1].dtype, device=DEVICE))
        outs.append(empty)
    o = torch.stack([o for o, _ in outs])  # [R, B, Hq, Lq, Dv]
    lse = torch.stack([lse for _, lse in outs])  # [R, B, Hq, Lq]
    return merge(o, lse)


@given(
    T=st.integers(1, 90), cp=st.integers(1, 4), kv_interleave=st.integers(1, 3),
    Lq=st.integers(1, 6), G=st.integers(1, 4), Hkv=st.integers(1, 2), B=st.integers(1, 2),
    positions=st.sampled_from(["decode", "chunked"]), mask=st.sampled_from([None, "bool", "additive"]),
    softcap=st.sampled_from([0.0, 5.0]), window=st.sampled_from([0, 3, 40]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16),
)
def test_sharded_merge_equals_whole(T, cp, kv_interleave, Lq, G, Hkv, B, positions, mask, softcap, window, dtype, seed):
    case = make_case(B=B, Hkv=Hkv, G=G, Lq=Lq, S=T, Dk=32, Dv=24, dtype=dtype, positions=positions,
                     mask=mask, softcap=softcap, window=window, seed=seed)
    whole = attention_with_lse_ref(*case.args())
    # The spec itself: exact in fp64.
    o, lse = sharded_attention("reference", case, cp, kv_interleave)
    assert_close(lse, whole[1], atol=1e-12, rtol=1e-12, what="reference lse")
    assert_close(o, whole[0], atol=1e-12, rtol=1e-12, what="reference o")
    for path in ("torch", "triton"):
        assert_attention_close(sharded_attention(path, case, cp, kv_interleave), whole, dtype, what=path)


def test_pure_empty_shards_and_tiny_sequence():
    # T=2 tokens over cp=4 ranks with I=3: rank 0 holds both, ranks 1-3 hold nothing; plus
    # two more ranks whose caches are empty: the merge must ignore all of them.
    case = make_case(B=2, Hkv=1, G=3, Lq=2, S=2, Dk=16, Dv=16, positions="decode")
    whole = attention_with_lse_ref(*case.args())
    for path in ("reference", "torch", "triton"):
        dtype = torch.float64 if path == "reference" else torch.float32
        out = sharded_attention(path, case, cp=4, kv_interleave=3, extra_empty=2)
        assert out[0].dtype == dtype
        assert_close(out[1], whole[1], what=f"{path} lse", atol=1e-5, rtol=1e-5)
        assert_close(out[0], whole[0], what=f"{path} o", **TOL[torch.float32])


def test_query_sees_nothing_anywhere():
    # Queries before the first token (positions < 0 after a chunk offset): every shard is
    # empty for them, and so is the merge.
    case = make_case(B=1, Hkv=1, G=2, Lq=3, S=20, Dk=16, Dv=16, positions="decode")
    case.pos_q -= 100
    for path in ("torch", "triton"):
        o, lse = sharded_attention(path, case, cp=3, kv_interleave=2)
        assert torch.isneginf(lse).all() and (o == 0).all()

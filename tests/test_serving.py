"""The serving engine (cpcompile/serving.py): any request stream, one process, a bounded set of graphs.

A stream of generate() calls with drawn prompt lengths, batch sizes, left padding, greedy and
seeded sampling must equal the single-device HF model call for call, never hit Dynamo's
recompile limit, and compile exactly one graph per shape key, never more than the bound.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpcompile import parallelize
from cpcompile.serving import batch_buckets, chunk_plan, chunk_sizes, generate_graph_bound, graph_bound
from cpcompile.tiny import tiny_model

FP32_ATOL = 1e-4  # logits are O(10); chunked prefill and the LSE kernel sum in another order
NEAR_TIE = 1e-3
MAX_LENGTH, CHUNK, MAX_BATCH = 96, 32, 4


def test_buckets_chunks_and_bound():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]
    assert chunk_sizes(256) == [16, 32, 64, 128, 256]
    assert chunk_sizes(100) == [16, 32, 64, 100]
    assert chunk_sizes(8) == [8]
    assert chunk_plan(2, 256) == [16]
    assert chunk_plan(17, 256) == [32]
    assert chunk_plan(256, 256) == [256]
    assert chunk_plan(600, 256) == [256, 256, 128]
    assert chunk_plan(513, 256) == [256, 256, 16]
    # buckets x input kinds x (decode + chunk sizes x logit modes); generate(): buckets x (1 + chunk sizes)
    assert graph_bound(16, 256) == 5 * 2 * (1 + 5 * 2) == 110
    assert generate_graph_bound(16, 256) == 5 * 6 == 30
    assert generate_graph_bound(MAX_BATCH, CHUNK) == 3 * 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """This module serves one model through all its tests (one process, one stream): Dynamo is
    reset once around the module (`served`), not around each test as elsewhere."""
    yield


@pytest.fixture(scope="module")
def served():
    torch._dynamo.reset()
    ref = tiny_model("llama", seed=1).eval()
    model = parallelize(copy.deepcopy(ref), max_length=MAX_LENGTH, prefill_chunk=CHUNK, max_batch=MAX_BATCH,
                        lowering="aot_eager")
    yield ref, model
    torch._dynamo.reset()


def _one_graph_per_shape(state):
    assert set(state.engine.compiles.values()) == {1}, state.engine.compiles
    assert state.graphs == len(state.engine.keys)


def _generate(model, ids, mask, new, sample_seed):
    sampling = dict(do_sample=True, top_k=20, temperature=0.9) if sample_seed is not None else dict(do_sample=False)
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True, **sampling)


@st.composite
def requests(draw):
    """One generate() call: batch, prompt width, per-row left padding, new tokens, greedy or a sampling seed."""
    new = draw(st.integers(1, 5))
    batch = draw(st.integers(1, MAX_BATCH))
    width = draw(st.integers(1, MAX_LENGTH - new))
    pads = [draw(st.integers(0, width - 1)) for _ in range(batch)]
    seed = draw(st.one_of(st.none(), st.integers(0, 2**16)))
    return batch, width, pads, new, seed, draw(st.integers(0, 2**16))


def _ids(batch, width, pads, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (batch, width), generator=g)
    mask = (torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def check_same(got, want, width):
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=FP32_ATOL, rtol=0)
    for b in range(got.sequences.shape[0]):
        for t, logits in enumerate(want.logits):
            if got.sequences[b, width + t] != want.sequences[b, width + t]:
                top2 = logits[b].topk(2).values
                assert top2[0] - top2[1] < NEAR_TIE, f"row {b} step {t}: tokens differ without a near-tie"
                break


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(requests(), min_size=6, max_size=8))
def test_request_stream_equals_single_device(served, stream):
    ref, model = served
    state = model._cpcompile
    for batch, width, pads, new, sample_seed, seed in stream:
        ids, mask = _ids(batch, width, pads, seed)
        got = _generate(model, ids, mask, new, sample_seed)
        want = _generate(ref, ids, mask, new, sample_seed)
        check_same(got, want, width)
        # exactly one graph per shape the engine ran, never more than the bound
        _one_graph_per_shape(state)
        assert state.graphs <= generate_graph_bound(MAX_BATCH, CHUNK)


def test_every_shape_of_the_bound_then_no_more_graphs(served):
    """Every batch bucket and chunk size once, then a second pass: no graph beyond the first pass."""
    ref, model = served
    state = model._cpcompile
    for batch in (1, 2, 3, 4):
        for width in (1, 5, 16, 17, 33, MAX_LENGTH - 2):  # decode-only, both chunk sizes, several chunks, near max_length
            ids, mask = _ids(batch, width, [0] * batch, width)
            check_same(_generate(model, ids, mask, 2, None), _generate(ref, ids, mask, 2, None), width)
    n = state.graphs
    _one_graph_per_shape(state)
    assert n == generate_graph_bound(MAX_BATCH, CHUNK)  # 3 buckets x (decode + 2 chunk sizes)
    ids, mask = _ids(3, 40, [5, 0, 39], 7)
    check_same(_generate(model, ids, mask, 3, None), _generate(ref, ids, mask, 3, None), 40)
    assert state.graphs == n


def test_forward_returns_all_logits_of_a_chunked_prompt(served):
    """A plain forward (no logits_to_keep) returns the logits of every token, chunked or not."""
    ref, model = served
    ids, mask = _ids(2, 45, [3, 0], 11)  # chunks of 32 + 16, the second right-padded and rewound
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask)
        want = ref(input_ids=ids, attention_mask=mask)
    assert got.logits.shape == want.logits.shape == (2, 45, 256)
    torch.testing.assert_close(got.logits[mask.bool()], want.logits[mask.bool()], atol=FP32_ATOL, rtol=0)


def test_errors_name_the_limit(served):
    _, model = served
    ids = torch.ones(MAX_BATCH + 1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"5 rows, more than max_batch=4.*buckets: \[1, 2, 4\]"):
        model.generate(ids, max_new_tokens=1)
    ids = torch.ones(1, MAX_LENGTH - 1, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"take the sequence to {MAX_LENGTH + 1} tokens, past max_length={MAX_LENGTH}"):
        model.generate(ids, max_new_tokens=3, min_new_tokens=3)
    with pytest.raises(ValueError, match="prefill_chunk=0"):
        parallelize(tiny_model("llama"), prefill_chunk=0)

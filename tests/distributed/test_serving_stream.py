"""A request stream on a gloo mesh (cpcompile/serving.py): tens of generate() calls with drawn
prompt lengths, batch sizes and left padding, greedy and seeded sampling, in one process per
rank; every call equals the single-device HF model, and each rank compiles exactly one graph
per shape key, within the bound.

tp2 x cp2 (Llama, and Mistral for a sliding window under chunking), and dp=2 with local
requests under ffn='world_tp', where replicas with different prompt lengths must agree on the
chunks (a replica with the shorter prompt runs chunks of padding only).
"""

import copy
import random

import pytest
import torch

from test_parallelize import FP32_ATOL, NEAR_TIE

MAX_LENGTH, CHUNK, MAX_BATCH = 96, 32, 4


def _request(rng: random.Random, settings: random.Random):
    """One call: the request (batch, width, left padding, ids) from `rng`; the generation settings
    (new tokens, greedy or a sampling seed) from `settings`, which every rank draws alike (ranks
    must agree on them, even where replicas pass their own requests)."""
    new = settings.randint(1, 5)
    sample = settings.random() < 0.3
    sample_seed = settings.randint(0, 2**16) if sample else None
    batch = rng.randint(1, MAX_BATCH)
    width = rng.randint(1, 70)
    pads = [rng.randint(0, width - 1) for _ in range(batch)]
    g = torch.Generator().manual_seed(rng.randint(0, 2**16))
    ids = torch.randint(3, 250, (batch, width), generator=g)
    mask = (torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask, new, sample_seed


def _generate(model, ids, mask, new, seed):
    kw = dict(do_sample=True, top_k=20) if seed is not None else dict(do_sample=False)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def run_stream(arch, n_requests, seed, **mesh):
    """On every rank: the stream through the reference and the parallel model, call by call."""
    import torch.distributed as dist

    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    parallelize(model, max_length=MAX_LENGTH, prefill_chunk=CHUNK, max_batch=MAX_BATCH, lowering="eager", **mesh)
    local = mesh.get("dp_inputs") == "local"
    replica = dist.get_rank() // (mesh.get("tp", 1) * mesh.get("cp", 1))
    rng = random.Random(seed + (1000 * replica if local else 0))  # local: each replica its own requests
    settings = random.Random(seed)
    calls = []
    for _ in range(n_requests):
        ids, mask, new, sample_seed = _request(rng, settings)
        got, got_logits = _generate(model, ids, mask, new, sample_seed)
        want, want_logits = _generate(ref, ids, mask, new, sample_seed)
        calls.append(dict(width=ids.shape[1], got=got, want=want, got_logits=got_logits, want_logits=want_logits))
    state = model._cpcompile
    return dict(calls=calls, graphs=state.graphs, compiles=dict(state.engine.compiles), bound=state.graph_bound)


def check_stream(results):
    from cpcompile.serving import generate_graph_bound

    for r, res in enumerate(results):
        assert set(res["compiles"].values()) == {1}, f"rank {r}: a shape compiled twice: {res['compiles']}"
        assert res["graphs"] == len(res["compiles"]) <= generate_graph_bound(MAX_BATCH, CHUNK)
        for i, c in enumerate(res["calls"]):
            torch.testing.assert_close(c["got_logits"], c["want_logits"], atol=FP32_ATOL, rtol=0,
                                       msg=lambda m: f"rank {r} call {i}: {m}")
            for b in range(c["got"].shape[0]):
                for t in range(c["want_logits"].shape[0]):
                    if c["got"][b, c["width"] + t] != c["want"][b, c["width"] + t]:
                        top2 = c["want_logits"][t, b].topk(2).values
                        assert top2[0] - top2[1] < NEAR_TIE, f"rank {r} call {i} row {b} step {t}: differs without a near-tie"
                        break


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_stream_on_tp2_cp2(world4, arch):
    results = world4.run(run_stream, arch, 10, 3, tp=2, cp=2)
    check_stream(results)
    for r in results[1:]:  # every rank generated the same tokens
        assert all(torch.equal(a["got"], b["got"]) for a, b in zip(r["calls"], results[0]["calls"]))


def test_stream_of_local_requests_under_world_tp(world2):
    """dp=2, each replica its own requests (different batch sizes and prompt lengths per call),
    FFN over both replicas' tokens: the replicas agree on buckets and chunks every call."""
    results = world2.run(run_stream, "llama", 8, 5, dp=2, ffn="world_tp", dp_inputs="local")
    check_stream(results)
    widths = [[c["width"] for c in r["calls"]] for r in results]
    assert widths[0] != widths[1]  # the replicas really served different prompt lengths

"""Vocab-parallel embedding and LM head (passes/shard_vocab.py) end to end on a gloo world.

One model covers the hard cases together: the embedding tied to the LM head (one shard, used
twice), a vocab not divisible by tp*cp (250 rows over 4 ranks: shards of 63 rows, the last one
with 61 real rows and 2 zero rows that must never win the argmax), and Gemma 2's final-logit
softcap after the gathered logits. Tokens must equal the single-device model's over a decode run,
logits within fp32's tolerance; weight bytes per rank are checked exactly.
"""

import copy

import torch

FP32_ATOL = 1e-4  # as tests/distributed/test_parallelize.py: logits O(10), the sum order differs
VOCAB, HIDDEN, WORLD = 250, 64, 4


def run_tied_padded(vocab_mode):
    from cpcompile import parallelize
    from cpcompile.sharding import weight_bytes
    from cpcompile.tiny import tiny_model

    model = tiny_model("gemma2", vocab_size=VOCAB, tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    ids[0, -1] = VOCAB - 1  # a token in the last rank's rows, next to the padding
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        full = weight_bytes(model)
        sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}  # tied: listed once
        parallelize(model, tp=2, cp=2, vocab=vocab_mode, max_length=32, lowering="eager", verify=False)
        got = model.generate(ids, **kw)
    try:  # the embedding is computed in the graph: inputs_embeds from outside is refused, never wrong
        model(inputs_embeds=torch.zeros(1, 3, HIDDEN))
        refusal = None
    except ValueError as e:
        refusal = str(e)
    state = model._cpcompile
    table = state.weights.shards.get("model.embed_tokens.weight")
    shards, local = state.weights.shards, state.weights.local
    stood_in = [n for s in shards.values() for n in (s.weight, s.bias) if n]  # each now 1 element (4 bytes)
    local_bytes = {k: sum(t.numel() * t.element_size() for t in v if t is not None) for k, v in local.items()}
    return dict(
        expected_bytes=full - sum(sizes[n] - 4 for n in stood_in) + sum(local_bytes.values()),
        table_bytes=local_bytes.get("model.embed_tokens.weight"),
        refusal=refusal, sequences=got.sequences, logits=torch.stack(got.logits), ref_sequences=want.sequences,
        ref_logits=torch.stack(want.logits), weight_bytes=weight_bytes(model), full=full,
        rows=None if table is None else (table.cols.tolist(), table.local_rows),
        embed_is_stand_in=model.model.embed_tokens.weight.untyped_storage().nbytes() <= 4,
        head_is_embed=model.lm_head.weight is model.model.embed_tokens.weight,
        collectives=state.backend.reports[-1].counts["collectives"], layers=model.config.num_hidden_layers,
        vocab_sharded=state.backend.reports[-1].counts.get("vocab_sharded"),
    )


def test_tied_embedding_and_padded_vocab_are_exact_and_split(world4):
    results = world4.run(run_tied_padded, "parallel")
    per = -(-VOCAB // WORLD)  # 63 rows per rank, the last rank 61 real + 2 padding
    for r, res in enumerate(results):
        assert torch.equal(res["sequences"], res["ref_sequences"]), f"rank {r}"
        torch.testing.assert_close(res["logits"], res["ref_logits"], atol=FP32_ATOL, rtol=0)
        assert res["logits"].shape[-1] == VOCAB  # the padding is cut off, never sampled
        # the replica rank order is (cp, tp): RankContext.ranks('replica'), rank r holds block r here
        lo = r * per
        assert res["rows"] == (list(range(lo, min(lo + per, VOCAB))), per)
        assert res["embed_is_stand_in"] and res["head_is_embed"]  # one stand-in, still tied
        # exactly: one table shard of `per` rows (tied: held and counted once), the full weights replaced
        # by 4-byte stand-ins, nothing else
        assert res["table_bytes"] == per * HIDDEN * 4
        assert res["weight_bytes"] == res["expected_bytes"]
        assert res["vocab_sharded"] == 2  # the lookup and the LM head, one shard
        assert "inputs_embeds" in res["refusal"] and "vocab='replicate'" in res["refusal"]
    coll, layers = results[0]["collectives"], results[0]["layers"]
    assert coll == dict(all_reduce=2 * layers + 1, all_to_all=layers, all_gather=1, reduce_scatter=0)

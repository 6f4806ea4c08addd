"""Each rank reads only its shards (cpcompile/loading.py, docs/loading.md), on a gloo world of 4.

Per case every rank builds the eager-loaded model and parallelizes it (the reference: the shards
`parallelize` cut from whole weights), and loads the same checkpoint with `from_pretrained`. Asserted
on every rank: the local shards are bitwise the eager path's; the bytes read from the files are
exactly this rank's shard bytes plus the replicated parameters (a tied one counted once); the
tokens of a stream of two `generate()` calls are the eager path's; the twin verification ran.
"""

import pytest
import torch

PROMPTS = [([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), ([[21, 22, 23], [24, 25, 26]], [[1, 1, 1], [1, 1, 1]])]


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def load_on_rank(path: str, arch: str, overrides: dict, mesh: dict, verify: bool):
    import cpcompile
    from cpcompile.tiny import tiny_model

    eager = cpcompile.parallelize(tiny_model(arch, **overrides), **mesh, verify=False, lowering="aot_eager", max_length=32)
    loaded = cpcompile.from_pretrained(path, **mesh, verify=verify, lowering="aot_eager", max_length=32)
    e, s = eager._cpcompile, loaded._cpcompile
    same_shards = e.parallel.local.keys() == s.parallel.local.keys() and all(
        torch.equal(e.parallel.local[k][0], s.parallel.local[k][0])
        and (e.parallel.local[k][1] is None) == (s.parallel.local[k][1] is None)
        and (e.parallel.local[k][1] is None or torch.equal(e.parallel.local[k][1], s.parallel.local[k][1]))
        for k in e.parallel.local
    )
    sharded = {n for sh in e.parallel.shards.values() for n in (sh.weight, sh.bias) if n}
    full = tiny_model(arch, **overrides)
    replicated = {id(p): p for n, p in full.named_parameters() if n not in sharded}.values()
    expected = sum(_nbytes(w) + _nbytes(b) for w, b in e.parallel.local.values()) + sum(map(_nbytes, replicated))
    tokens = []
    for ids, mask in PROMPTS:
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        tokens.append((eager.generate(ids, **kw), loaded.generate(ids, **kw)))
    return dict(same_shards=same_shards, bytes_read=s.checkpoint.bytes_read, expected=expected,
                whole=sum(map(_nbytes, {id(p): p for p in full.parameters()}.values())),
                same_tokens=all(torch.equal(a, b) for a, b in tokens), verification=s.verification)


@pytest.mark.parametrize(
    "arch, overrides, mesh, verify",
    [
        # tied embeddings, a checkpoint in several files, the twin verification
        ("llama", {"tie_word_embeddings": True}, dict(tp=2, cp=2), True),
        # Phi-3's packed qkv and gate_up (reads gathered over runs), attention data parallel with
        # the FFN over every rank
        ("phi3", {}, dict(dp=2, cp=2, ffn="world_tp"), False),
    ],
)
def test_each_rank_reads_its_shards(world4, tmp_path, arch, overrides, mesh, verify):
    from cpcompile.tiny import tiny_model

    tiny_model(arch, **overrides).save_pretrained(tmp_path, max_shard_size="100KB")
    results = world4.run(load_on_rank, str(tmp_path), arch, overrides, mesh, verify, timeout_s=900)
    for rank, r in enumerate(results):
        assert r["same_shards"], rank
        assert r["bytes_read"] == r["expected"], (rank, r)
        assert r["bytes_read"] < r["whole"], (rank, r)
        assert r["same_tokens"], rank
        assert r["verification"] is None if not verify else r["verification"]["twin"] is True

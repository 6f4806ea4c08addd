"""Each rank reads only its shards (cpcompile/loading.py, docs/loading.md), on a gloo world of 4.

Per case every rank loads a checkpoint with `from_pretrained`. Asserted on every rank: each local
shard is bitwise what `shard_weights.local_tensors` cuts from the whole weight (what the eager path
holds); the bytes read from the files are exactly this rank's shard bytes plus the replicated
parameters (a tied one counted once) and less than the whole model; the tokens of a stream of two
`generate()` calls are the single-device model's; the twin verification ran where asked.
"""

import pytest
import torch

PROMPTS = [([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
           ([[21, 22, 23], [24, 25, 26]], [[1, 1, 1], [1, 1, 1]])]


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def load_on_rank(path: str, arch: str, overrides: dict, mesh: dict, verify: bool):
    import cpcompile
    from cpcompile.passes.shard_weights import local_tensors
    from cpcompile.tiny import tiny_model

    full = tiny_model(arch, **overrides)  # the eager-loaded, single-device model
    params = dict(full.named_parameters())
    loaded = cpcompile.from_pretrained(path, **mesh, verify=verify, lowering="aot_eager", max_length=32)
    s = loaded._cpcompile
    same_shards, shard_bytes = True, 0
    for name, shard in s.weights.shards.items():
        want_w, want_b = local_tensors(shard, params[name].detach(), params[shard.bias].detach() if shard.bias else None)
        got_w, got_b = s.weights.local[name]
        same_shards &= torch.equal(got_w, want_w) and (got_b is None) == (want_b is None)
        same_shards &= want_b is None or torch.equal(got_b, want_b)
        shard_bytes += _nbytes(want_w) + _nbytes(want_b)
    sharded = {n for sh in s.weights.shards.values() for n in (sh.weight, sh.bias) if n}
    replicated = {id(p): p for n, p in full.named_parameters() if n not in sharded}.values()
    tokens = []
    for ids, mask in PROMPTS:
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        tokens.append((full.generate(ids, **kw), loaded.generate(ids, **kw)))
    return dict(same_shards=same_shards, bytes_read=s.checkpoint.bytes_read,
                expected=shard_bytes + sum(map(_nbytes, replicated)),
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

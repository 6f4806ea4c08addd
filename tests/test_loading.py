"""Sharded loading on one process (cpcompile/loading.py): the reader, the empty model, the errors, and
`from_pretrained` at tp = cp = 1 against the eager-loaded model. The multi-rank reads are in
tests/distributed/test_sharded_loading.py."""

import pytest
import torch

import cpcompile
from cpcompile.loading import Checkpoint, CheckpointError, contiguous_runs, empty_model
from cpcompile.passes.shard_weights import WeightShard, local_tensors
from cpcompile.tiny import tiny_model

PROMPTS = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def _save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


def test_runs():
    assert contiguous_runs(torch.tensor([0, 1, 2, 5, 6, 9])) == [(0, 3), (5, 7), (9, 10)]
    assert contiguous_runs(torch.tensor([4])) == [(4, 5)]


@pytest.mark.parametrize("kind, transposed", [("column", False), ("row", False), ("column", True), ("row", True)])
def test_read_shard_is_local_tensors(tmp_path, kind, transposed):
    """The reader's slice of a stored weight is `local_tensors` of the whole one, for every
    orientation, with a gathered (non-contiguous) index; it reads exactly those bytes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, generator=g)  # linear [out=12, in=8]
    b = torch.randn(12, generator=g)
    stored = w.t().contiguous() if transposed else w
    save_file({"w": stored, "b": b}, str(tmp_path / "model.safetensors"))
    cols = torch.tensor([0, 1, 4, 5, 7]) if kind == "row" else torch.tensor([1, 2, 3, 8, 10, 11])
    shard = WeightShard("w", kind, "tp", cols, (12, 8), bias="b", transposed=transposed)
    ck = Checkpoint(tmp_path)
    got_w, got_b = ck.read_shard(shard)
    want_w, want_b = local_tensors(shard, stored, b)
    assert torch.equal(got_w, want_w) and torch.equal(got_b, want_b)
    other = 8 if kind == "column" else 12
    assert ck.bytes_read == (len(cols) * other + (len(cols) if kind == "column" else 12)) * 4


def test_empty_model_has_no_weights_and_real_buffers(tmp_path):
    path = _save(tiny_model("llama", tie_word_embeddings=True).to(torch.bfloat16), tmp_path)
    m = empty_model(path)
    assert all(p.is_meta for p in m.parameters())
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())  # the checkpoint's dtype
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied as the model ties them
    ref = tiny_model("llama")
    for (n, b), (_, want) in zip(m.named_buffers(), ref.named_buffers()):
        assert not b.is_meta and torch.equal(b, want), n
    assert all(p.dtype == torch.float32 for p in empty_model(path, torch.float32).parameters())


@pytest.mark.parametrize("arch, overrides", [("llama", {"tie_word_embeddings": True})])
def test_from_pretrained_matches_eager(tmp_path, arch, overrides):
    """tp = cp = 1: every parameter read whole (a tied one once, from a checkpoint split in files),
    the same tokens and logits as the eager-loaded model, verified on the twin."""
    eager = tiny_model(arch, **overrides)
    path = _save(eager, tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = cpcompile.from_pretrained(path, lowering="aot_eager", max_length=32)
    state = model._cpcompile
    assert state.verification["twin"] is True
    unique = {id(p): p for p in eager.parameters()}.values()
    assert state.checkpoint.bytes_read == sum(p.numel() * p.element_size() for p in unique)
    # a stream: batch sizes 2, 1, 3 and prompt lengths 2..9 (left-padded) in one process
    g = torch.Generator().manual_seed(0)
    stream = [(PROMPTS, MASK)]
    for rows, width in ((1, 9), (3, 4)):
        ids = torch.randint(3, 250, (rows, width), generator=g)
        mask = torch.ones_like(ids)
        mask[0, : width // 2] = 0
        stream.append((ids.masked_fill(mask == 0, 0), mask))
    for ids, mask in stream:
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), eager.generate(ids, **kw))


def test_refusals(tmp_path):
    path = _save(tiny_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="meta device .* no checkpoint= was given"):
        cpcompile.parallelize(empty_model(path))
    with pytest.raises(ValueError, match="already hold weights"):
        cpcompile.parallelize(tiny_model("llama"), checkpoint=path)
    with torch.device("meta"):
        import transformers

        bare = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    with pytest.raises(ValueError, match="buffers .* meta device.*empty_model"):
        cpcompile.parallelize(bare, checkpoint=path)
    with pytest.raises(CheckpointError, match="is not a directory"):
        Checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        Checkpoint(tmp_path / "empty")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _save(tiny_model("llama"), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing \(first: \['model.norm.weight'\]\)"):
        cpcompile.parallelize(empty_model(path), checkpoint=path, verify=False, lowering="aot_eager")


def test_converted_checkpoint_is_refused_before_compiling(tmp_path):
    """DeepSeek-V3's experts are saved per expert and merged by transformers at load: not slices."""
    path = _save(tiny_model("deepseek_v3", dtype=torch.bfloat16), tmp_path)
    with pytest.raises(CheckpointError, match="layout transformers converts while loading"):
        cpcompile.from_pretrained(path)


def test_renamed_keys_are_read(tmp_path):
    """GPT-NeoX's head is saved as `embed_out` and renamed to `lm_head` by transformers at load."""
    eager = tiny_model("gpt_neox")
    path = _save(eager, tmp_path)
    ck = Checkpoint(path).for_model(empty_model(path))
    assert "lm_head.weight" in ck and "embed_out.weight" not in ck
    assert torch.equal(ck.read("lm_head.weight"), eager.lm_head.weight)


def test_explain_an_empty_model(tmp_path):
    """`explain` needs no weights either: the same sites and roles as the loaded model's."""
    eager = tiny_model("phi3")
    path = _save(eager, tmp_path)
    empty, loaded = cpcompile.explain(empty_model(path), tp=2, cp=2), cpcompile.explain(eager, tp=2, cp=2)
    assert str(empty) == str(loaded)

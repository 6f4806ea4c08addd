"""Models whose projections are not nn.Linear, end to end at tp2 x cp2 (issue: four architectures
gave wrong tokens without an error when their projections were `x @ W.T` or Conv1D's addmm)."""

import functools

import pytest

from cpcompile.testing import assert_equivalent
from cpcompile.tiny import tiny_model


@pytest.mark.parametrize(
    "arch, form, overrides",
    [
        ("llama", "matmul", {"tie_word_embeddings": True}),  # the LM head, tied and written x @ W.T, is not o
        ("qwen2", "conv1d", {}),  # weights stored [in, out], biases folded, FFN gate/up/down through views
    ],
)
def test_projection_form_is_exact(world4, arch, form, overrides):
    result = assert_equivalent(
        functools.partial(tiny_model, arch, linear_form=form, **overrides),
        tp=2, cp=2, prompts=[[5, 6, 7, 8, 9, 10], [11, 12, 13]], max_new_tokens=4, world=world4, lowering="aot_eager",
    )
    assert result.ranks_bitwise_equal

"""Pass 0: every projection form becomes a linear, with the weight's stored orientation known."""

import pytest
import torch
from torch import nn

from cpcompile.options import Options
from cpcompile.passes import analyze
from cpcompile.passes._fx import op_count
from cpcompile.passes.find_attention import find_attention_sites
from cpcompile.passes.find_projections import find_projections, weight_input
from cpcompile.passes.normalize_linears import normalize_linears, unrecognised_products

from tests.passes._graphs import capture_graph, hf_graph, weight_names

IN, OUT = 4, 8


class Forms(nn.Module):
    """One projection per form; `w` is stored [out, in] (nn.Linear), `wc` [in, out] (Conv1D)."""

    def __init__(self, form: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.form = form
        self.w = nn.Parameter(torch.randn(OUT, IN, generator=g))
        self.wc = nn.Parameter(torch.randn(IN, OUT, generator=g))
        self.b = nn.Parameter(torch.randn(OUT, generator=g))

    def forward(self, x):
        f, w, wc, b = self.form, self.w, self.wc, self.b
        if f == "matmul_T":
            return x @ w.T
        if f == "torch_matmul_t":
            return torch.matmul(x, w.t())
        if f == "mm_transpose":
            return torch.mm(x.view(-1, IN), w.transpose(0, 1)).view(*x.shape[:-1], OUT)
        if f == "addmm_conv1d":
            return torch.addmm(b, x.view(-1, IN), wc).view(*x.shape[:-1], OUT)
        if f == "matmul_plus_bias":
            return x @ wc + b
        if f == "cast_matmul":
            return (x.double() @ w.double().T).float()
        if f == "bmm_expand":
            return torch.bmm(x, wc.expand(x.shape[0], IN, OUT))
        if f == "baddbmm":
            return torch.baddbmm(b, x, wc.unsqueeze(0).expand(x.shape[0], IN, OUT))
        if f == "linear_of_transpose":
            return nn.functional.linear(x, wc.t(), b)
        raise AssertionError(f)


# form -> (the weight the linear reads, stored transposed ([in, out])?, bias folded?)
FORMS = {
    "matmul_T": ("w", False, False),
    "torch_matmul_t": ("w", False, False),
    "mm_transpose": ("w", False, False),
    "addmm_conv1d": ("wc", True, True),
    "matmul_plus_bias": ("wc", True, True),
    "cast_matmul": ("w", False, False),
    "bmm_expand": ("wc", True, False),
    "baddbmm": ("wc", True, True),
    "linear_of_transpose": ("wc", True, True),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_becomes_one_linear_with_its_orientation(form):
    m = Forms(form)
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(1))
    want = m(x)
    gm = capture_graph(m, x)
    already = op_count(gm, "linear")
    assert normalize_linears(gm) == 1 - already
    assert op_count(gm, "linear") == 1
    assert op_count(gm, "matmul") == 0
    (lin,) = [n for n in gm.graph.nodes if n.target is torch._C._nn.linear]
    src, transposed = weight_input(lin.args[1])
    name, stored_in_out, folded = FORMS[form]
    assert src.target.endswith(f"_{name}_")  # Dynamo's placeholder for self.<name>
    assert transposed is stored_in_out
    assert (len(lin.args) > 2 and lin.args[2] is not None) is folded
    got = gm(*gm.example_inputs)
    got = got[0] if isinstance(got, (tuple, list)) else got
    # the same products from the same memory; a folded bias is added inside the product (1 ulp)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_products_it_does_not_read_are_listed_not_guessed():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(OUT, IN))

        def forward(self, x):
            return torch.einsum("bti,oi->bto", x, self.w), self.w @ x.transpose(-1, -2)

    gm = capture_graph(Odd(), torch.randn(2, 3, IN))
    assert normalize_linears(gm) == 0
    notes = unrecognised_products(gm)
    assert len(notes) == 2 and all("does not read as a projection" in n for n in notes)


@pytest.mark.parametrize("form", ["matmul", "conv1d"])
def test_projection_forms_get_the_roles_of_nn_linear(form):
    """A tiny Llama/Qwen2 whose projections are written `x @ W.T` or Conv1D-style `addmm` gets the
    same roles as with nn.Linear; the KV cache writes survive the rewrite (k and v are found)."""
    arch = "qwen2"  # biases on q/k/v: folded into the linear
    base_model, base = hf_graph(arch)
    model, gm = hf_graph(arch, linear_form=form)
    roles = {p.weight: (p.role, p.layer) for p in analyze(base, Options(), weight_names(base_model, base)).roles.projections}
    analysis = analyze(gm, Options(), weight_names(model, gm))
    got = {p.weight: (p.role, p.layer) for p in analysis.roles.projections}
    assert got == roles
    transposed = {p.weight for p in analysis.roles.projections if p.transposed}
    assert transposed == ({w for w in got if ".layers." in w} if form == "conv1d" else set())
    biased = {p.weight for p in analysis.roles.projections if p.bias}
    with_bias = ("q_proj", "k_proj", "v_proj") if form == "matmul" else (".layers.",)  # AddmmConv1D always adds one
    assert biased == {w for w in got if any(k in w for k in with_bias)}
    assert analysis.notes == []


def test_a_site_without_projections_is_refused_not_guessed():
    """Without pass 0 the matmul-form Llama has no linear at all: the plan names what is missing
    and refuses every mesh with tp or cp > 1 (tp = cp = 1 still runs: nothing is sharded)."""
    from cpcompile.passes.plan import Mesh, MeshError, plan

    model, gm = hf_graph("llama", linear_form="matmul")
    sites = find_attention_sites(gm)
    roles = find_projections(gm, sites, weight_names(model, gm))  # pass 0 skipped on purpose
    assert {p.role for p in roles.projections} == {"embedding"}  # the lookup, not a linear
    plan(roles, sites, Mesh(1, 1))
    with pytest.raises(MeshError, match=r"layer 0: no q/k/v/o projection found by dataflow") as e:
        plan(roles, sites, Mesh(1, 2))
    assert "Valid (tp, cp) for this model with combine='all_to_all': [(1, 1)]" in str(e.value)


def test_tied_lm_head_written_as_matmul_is_never_o():
    """The report's case: `x @ W.T` layers and an LM head tied to the embedding. The head is the
    first linear after the last attention's output but lies past the residual add: never `o`."""
    model, gm = hf_graph("llama", linear_form="matmul", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    roles = analyze(gm, Options(tp=2, cp=2), weight_names(model, gm)).roles
    head = [p for p in roles.projections if p.weight == "model.embed_tokens.weight"]
    assert [(p.role, p.layer) for p in head] == [("embedding", -1), ("lm_head", -1)]  # one table, one vocab shard
    assert [p.role for p in roles.by_layer(1)] == ["q", "k", "v", "o", "gate", "up", "down"]

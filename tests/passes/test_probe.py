"""Dependency probing (`cpcompile/passes/_probe.py`): columns found by gradient support, and a
clear refusal where the subgraph's layout depends on the traced data (routed projections)."""

import operator

import pytest
import torch
from torch import fx

from cpcompile.passes._probe import ProbeError, column_support


def _graph(mask_at_trace: torch.Tensor):
    """lin = x @ W.T ([4, 8]); rows picked by a router's boolean mask, then split by the sizes
    seen at trace time (what Dynamo bakes for a routed MoE), each half summed over rows."""
    g = fx.Graph()
    x, w, mask = g.placeholder("x"), g.placeholder("w"), g.placeholder("mask")
    x.meta["val"], w.meta["val"] = torch.randn(4, 6), torch.randn(8, 6)
    mask.meta["val"] = mask_at_trace
    lin = g.call_function(torch._C._nn.linear, (x, w))
    lin.meta["val"] = torch.randn(4, 8)
    picked = g.call_function(operator.getitem, (lin, mask))
    n = int(mask_at_trace.sum())
    picked.meta["val"] = torch.randn(n, 8)
    parts = g.call_method("split", (picked, [1, n - 1]))
    first = g.call_function(operator.getitem, (parts, 0))
    out = g.call_method("sum", (first, 0))
    out.meta["val"] = torch.randn(8)
    g.output(out)
    return lin, out


def test_columns_of_a_shape_only_path():
    lin, out = _graph(torch.ones(4, dtype=torch.bool))  # every row routed: sizes hold for any values
    assert column_support(lin, out, lambda t: t[2:5]).tolist() == [2, 3, 4]


def test_data_dependent_path_is_refused_by_name():
    lin, out = _graph(torch.tensor([True, False, True, True]))  # 3 rows at trace; the probe routes 4
    with pytest.raises(ProbeError, match=r"depends on the data.*split.*routed projections") as e:
        column_support(lin, out, lambda t: t)
    assert isinstance(e.value, ValueError) and isinstance(e.value.__cause__, RuntimeError)

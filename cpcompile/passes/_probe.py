"""Which columns of a tensor feed which part of another: dependency probing by autograd.

The sharding passes must know, for a (possibly fused) projection, which output columns end up
in which attention head — Phi-3 slices one qkv output at fixed offsets, GPT-NeoX interleaves
[q_h, k_h, v_h] per head, a fused gate_up is chunked. Rather than knowing each packing, we
run the subgraph between the two nodes on random values and read the support of the
gradient: column c of `src` feeds the selected part of `dst` iff d(selected)/d(src[..., c]) != 0.
Random inputs make an accidental exact zero a probability-zero event.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from cpcompile.passes._fx import ancestors, descendants, val


def _random_like(v, gen: torch.Generator):
    if not isinstance(v, torch.Tensor):
        return v
    shape, dtype = tuple(int(s) for s in v.shape), v.dtype
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.zeros(shape, dtype=dtype)


PROBES = 8  # random points per column-support probe (see column_support)


def is_statistic(n: fx.Node) -> bool:
    """A `sum` or `mean` over the last dim only: what a norm reduces its input to (`pow(2).mean(-1)`).
    Column probes treat its value as a constant, since `local_layouts` sums it over the ranks exactly
    (one all-reduce of the statistic) wherever it reduces a sharded dim; the two read this one rule.
    A reduction over any other dim (a sum over routed rows) is an ordinary dependency."""
    if n.op not in ("call_function", "call_method") or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if name not in ("sum", "mean") or n.kwargs.get("dtype") is not None:
        return False
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    x = val(n.args[0])
    return len(dims) == 1 and isinstance(dims[0], int) and isinstance(x, torch.Tensor) and dims[0] % max(x.dim(), 1) == x.dim() - 1


@torch.enable_grad()  # parallelize may be called under torch.no_grad()
def column_support(src: fx.Node, dst: fx.Node, select: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sorted indices c of `src`'s last dim such that `select(dst)` depends on `src[..., c]`, a norm's
    statistic (`is_statistic`) counted as a constant: a q/k norm over the whole projection width
    then leaves the projection sharded by heads, its statistic all-reduced (local_layouts.py).

    The gradient at one random point can be exactly zero where the dependency is real: a ReLU
    (Arcee's relu^2 FFN) has zero slope at half of all inputs, so with the few rows of the captured
    graph a column would be missed with probability 2^-rows, and a rank would silently lack it. The
    union over `PROBES` independent points makes that 2^-(rows * PROBES)."""
    used = None
    for seed in range(PROBES):
        gen = torch.Generator().manual_seed(seed)
        x = _random_like(val(src), gen).requires_grad_(True)
        y = select(_evaluate(src, dst, x, gen, statistics=True))
        (grad,) = torch.autograd.grad((y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum(), x)
        here = grad.abs().reshape(-1, grad.shape[-1]).sum(0) != 0
        used = here if used is None else used | here
    return used.nonzero().flatten()


def forward_support(src: fx.Node, dst: fx.Node, region: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sorted indices c of `dst`'s last dim whose value changes when `src[region(src)]` changes.

    `region(x)` returns a boolean mask of `src`'s shape (e.g. the heads one rank keeps).
    """
    outs = []
    for perturb in (False, True):
        gen = torch.Generator().manual_seed(1)
        x = _random_like(val(src), gen)
        if perturb:
            m = region(x)
            x = torch.where(m, x + 1.0 + torch.rand(x.shape, dtype=x.dtype), x)
        outs.append(_evaluate(src, dst, x, torch.Generator().manual_seed(2)))
    changed = (outs[0] != outs[1]).reshape(-1, outs[0].shape[-1]).any(0)
    return changed.nonzero().flatten()


def _evaluate(src: fx.Node, dst: fx.Node, x: torch.Tensor, gen: torch.Generator, statistics: bool = False) -> torch.Tensor:
    on_path = descendants([src], lambda n: n is dst) & (ancestors(dst, lambda n: n is src) | {dst})
    return evaluate(on_path, {src: x}, gen, f"from {src.name} to {dst.name}", statistics)[dst]


def evaluate(nodes: set[fx.Node], env: dict[fx.Node, object], gen: torch.Generator, where: str,
             statistics: bool = False) -> dict[fx.Node, object]:
    """Run `nodes` in graph order in float64, with the values in `env` for the nodes given there and
    random values for any other input they read; returns `env` filled in. A fresh `new_empty` is
    filled with NaN, so a column nothing writes can never pass for a value."""
    env = dict(env)

    def load(a):
        if isinstance(a, fx.Node):
            if a not in env:
                env[a] = _random_like(val(a), gen)
            return env[a]
        return a

    first = next(iter(nodes)) if nodes else None
    for n in (n for n in first.graph.nodes if n in nodes and n not in env) if first is not None else ():
        args = fx.node.map_aggregate(n.args, load)
        kwargs = fx.node.map_aggregate(n.kwargs, load)
        args = tuple(torch.float64 if isinstance(a, torch.dtype) and a.is_floating_point else a for a in args)
        kwargs = {k: (torch.float64 if isinstance(v, torch.dtype) and v.is_floating_point else v) for k, v in kwargs.items()}
        if n.op not in ("call_function", "call_method"):
            raise ProbeError(f"probe: cannot evaluate {n.op} node {n.name} on the path {where}")
        try:
            env[n] = n.target(*args, **kwargs) if n.op == "call_function" else getattr(args[0], n.target)(*args[1:], **kwargs)
            if n.op == "call_method" and n.target == "new_empty":
                env[n] = env[n].fill_(float("nan"))
            if statistics and is_statistic(n) and isinstance(env[n], torch.Tensor):
                env[n] = env[n].detach()  # a norm's statistic: summed over the ranks, not a column dependency
        except (RuntimeError, IndexError, ValueError) as e:
            # Sizes or indices fixed at capture from the traced values (a router's split sizes, a
            # gather by routed expert) do not hold for other values: the layout between src and dst
            # depends on the data, and no static sharding of it can be exact.
            raise ProbeError(
                f"probe: the path {where} depends on the data, not only on shapes: "
                f"{n.name} ({getattr(n.target, '__name__', n.target)}) fails on values other than the traced ones "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). This is what routed projections look like "
                "(mixture-of-experts FFNs or attention heads, whose split sizes come from the router); cpcompile "
                "cannot shard them in this version"
            ) from e
    return env


class ProbeError(ValueError):
    """The subgraph between two nodes cannot be probed on random values (its layout depends on data)."""

"""Pass 5d — keep sharded activations local: no pad back to full width, no slice back to the shard.

`shard_linears`, `shard_experts` and `rewrite_attention` first write each sharded result back into the
single-device width (a column linear's or expert matmul's output at this rank's columns, the attention
output at this rank's heads, zeros elsewhere), so that every op Dynamo traced still sees its traced shape. This pass then
carries the *local* tensor forward instead, op by op, the way `split_tokens` carries a token
layout: a feature-sharded layout `Local(dim, idx, full)` says "this node's values along `dim` are
the single-device node's at the sorted indices `idx` of `full`" (DESIGN.md section 3, "Layouts
stay local").

Cases handled (each rewritten node is the same op on the local operands, its shape constants
made local):
  * views: view / reshape (the sharded dim split into heads x head_dim or merged back, when the
    shard is whole heads: checked on the element sets, not by name), transpose, permute,
    unsqueeze, squeeze, flatten, expand, contiguous, clone, casts;
  * pointwise ops (RoPE's `q*cos + rotate_half(q)*sin`, `silu(gate) * up`, a bias, a per-head
    norm's scaling): a local operand of the same layout is used as is, an operand broadcast along
    the sharded dim as is, a replicated operand of the full size is narrowed to `idx` (a per-head
    weight, a cos/sin table with a head dim);
  * reductions and norms over other dims (a per-head RMSNorm's `pow(2).mean(-1)`, `F.rms_norm`,
    `F.layer_norm` over the head dim), `cat` / `chunk` / `split` / slicing along other dims
    (rotate_half);
  * a reduction over the sharded dim itself (a norm over a whole projection's width, OLMo-2's q/k
    norm): the sum over the local part, then one all-reduce of that statistic (a `[..., 1]`
    tensor, never the activations) over the group the dim is split over, divided by how many
    ranks of the group hold each index (tp > Hkv repeats KV heads). `shard_weights` sharded the
    projection on that promise (`_probe.STATISTICS`: the probe treats these reductions as
    constants), so the two read the same rule;
  * slicing and `chunk` / `split` / `index_select` along the sharded dim (Phi-3's qkv offsets, a
    fused gate_up): the local part of each piece. A slice that selects exactly the local part (the
    attention's `q[:, h0:h1]`, the cache write's KV heads, a row-parallel linear's `x[..., c0:c1]`)
    *is* the local tensor: its users take the local node and the slice goes.
Anything else keeps the single-device node it had, fed by the zero-padded value: exact, since
`shard_weights` chose this rank's columns as everything the consumer's local part depends on
(`_probe.column_support`), and counted in `kept_full` so that `explain` and the tests see it.

Before (Qwen3 q at tp = 2, rank 0):
    q = linear(x, w_q_local)                     # f32[1, 5, 32]
    p = F.pad(q, (0, 32))                        # f32[1, 5, 64]
    v = p.view((1, 5, -1, 16)); ... RMSNorm, RoPE on 4 heads ...
    q_mine = q_embed[:, 0:2]                     # f32[1, 2, 5, 16]
After:
    q = linear(x, w_q_local)                     # f32[1, 5, 32]
    v = q.view((1, 5, 2, 16)); ... RMSNorm, RoPE on 2 heads ...
    attention_with_lse(q_embed_local, ...)

Invariants: every inserted node carries `meta["val"]`; the single-device nodes left without users
are erased (never an in-place one); the local values equal the single-device ones at `idx`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from cpcompile.passes._fx import descendants, insert_call, shape, source_line, val
from cpcompile.passes._probe import is_statistic

_c10d = torch.ops._c10d_functional

LOCAL_META = "cpcompile_local"  # on a padded node: the `Local` it stands for (set by shard_linears, rewrite_attention)


@dataclass(frozen=True)
class Local:
    """A node's local stand-in: along `dim` it holds the single-device values at `idx` (sorted) of `full`;
    `group`: the group whose ranks split that dim between them (for a statistic's all-reduce)."""

    node: fx.Node
    dim: int
    idx: tuple[int, ...]
    full: int
    group: str
    group_name: str
    group_size: int

    def moved(self, node: fx.Node, dim: int, idx: tuple[int, ...] | None = None, full: int | None = None) -> "Local":
        return Local(node, dim, self.idx if idx is None else idx, self.full if full is None else full, self.group,
                     self.group_name, self.group_size)

    @property
    def complete(self) -> bool:
        return self.idx == tuple(range(self.full))


@dataclass(frozen=True)
class _Pieces:
    """chunk / split output: one Local (or None: not understood) per piece."""

    pieces: tuple


class LayoutError(ValueError):
    """A sharded layout that cannot be kept exact (named, with what to do)."""


class _NotLocal(Exception):
    """This op is not one the pass carries a local layout through (the node keeps its full width)."""


def mark_local(node: fx.Node, local_node: fx.Node, dim: int, idx, full: int, group: str, group_name: str, size: int) -> None:
    """Record on `node` (the padded single-device-width value) the local tensor it stands for."""
    idx = tuple(int(i) for i in idx)
    node.meta[LOCAL_META] = Local(local_node, dim % len(shape(node)), idx, full, group, group_name, size)


def keep_local(gm: fx.GraphModule) -> dict[str, int]:
    """Returns counts: `seeds` (padded values), `local` (nodes now computed on the shard), `ends`
    (nodes replaced by a whole value: slices that were the local tensor, and the statistics), `statistics` (all-reduced norm statistics), `kept_full`
    (nodes left at full width because no rule carries the layout through them)."""
    return _Localizer(gm).run()


_POINTWISE_FN = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.floordiv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt, torch.exp, torch.tanh,
    torch.sigmoid, torch.where, torch.clamp, torch.square, torch.abs, torch.erf, torch.log, torch.sin, torch.cos,
    torch.reciprocal, torch.maximum, torch.minimum, torch.masked_fill,
    F.silu, F.gelu, F.relu, F.relu6, F.leaky_relu, F.elu, F.softplus, F.mish, F.hardtanh, F.tanh, F.sigmoid, F.dropout,
    F.logsigmoid,
}
_POINTWISE_METHOD = {
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "clamp", "square", "abs",
    "float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous", "clone", "detach", "relu", "masked_fill",
    "__add__", "__sub__", "__mul__", "__truediv__", "__radd__", "__rmul__", "__rsub__", "__neg__", "__pow__", "reciprocal",
    "log", "erf", "sin", "cos",
}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std"}
_VIEW_METHODS = {"view", "reshape"}


def _name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


class _Localizer:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.g = gm, gm.graph
        self.env: dict[fx.Node, Local | _Pieces] = {}
        self.counts = {"seeds": 0, "local": 0, "ends": 0, "statistics": 0, "kept_full": 0}
        self.kept: list[str] = []
        self.replaced: set[fx.Node] = set()

    def run(self) -> dict[str, int]:
        seeds = [n for n in self.g.nodes if LOCAL_META in n.meta]
        if not seeds:
            return self.counts
        for n in list(self.g.nodes):
            if LOCAL_META in n.meta:
                seed = self.env[n] = n.meta.pop(LOCAL_META)
                self.counts["seeds"] += 1
                if seed.complete:  # the shard is every column (a probe found that the consumer needs them all)
                    n.replace_all_uses_with(seed.node)
                    self.replaced.add(n)
                continue
            if not any(a in self.env for a in n.all_input_nodes):
                continue
            try:
                with self.g.inserting_before(n):
                    out = self._rule(n)
            except _NotLocal as e:
                self.counts["kept_full"] += 1
                self.kept.append(f"{n.name} ({source_line(n)}): {e}")
                continue
            if isinstance(out, _Whole) or isinstance(out, Local) and out.complete and shape(out.node) == shape(n):
                n.replace_all_uses_with(out.node)  # the local tensor is the whole value: an end of the layout
                self.replaced.add(n)
                self.counts["ends"] += 1
            else:
                self.env[n] = out
                self.counts["local"] += 1
        self._erase_dead()
        self._check_statistics()
        self.g.lint()
        self.gm.recompile()
        self.gm.meta.setdefault("cpcompile_kept_full", []).extend(self.kept)
        return self.counts

    # ---- rules ------------------------------------------------------------------------------
    def _rule(self, n: fx.Node) -> Local | _Pieces:
        if n.op not in ("call_function", "call_method"):
            raise _NotLocal(f"{n.op} {n.target}")
        name = _name(n)
        t = n.target
        if t is operator.getitem:
            return self._getitem(n)
        x = n.args[0] if n.args else None
        loc = self.env.get(x) if isinstance(x, fx.Node) else None
        if isinstance(loc, _Pieces):
            raise _NotLocal("a chunk's tuple used whole")
        if name in _VIEW_METHODS or name in ("flatten", "squeeze", "unflatten") or t in (torch.reshape, torch.flatten, torch.squeeze):
            return self._reshape(n, loc)
        if name in ("transpose", "swapaxes") or t is torch.transpose:
            return self._transpose(n, loc)
        if name == "permute" or t is torch.permute:
            return self._permute(n, loc)
        if name == "unsqueeze" or t is torch.unsqueeze:
            return self._unsqueeze(n, loc)
        if name == "expand":
            return self._expand(n, loc)
        if name in ("chunk", "split") or t in (torch.chunk, torch.split):
            return self._split(n, loc)
        if name == "index_select" or t is torch.index_select:
            return self._index_select(n, loc)
        if name == "cat" or t is torch.cat:
            return self._cat(n)
        if name == "stack" or t is torch.stack:
            return self._cat(n, stack=True)
        if name in _REDUCE:
            return self._reduce(n, loc)
        if t in (F.rms_norm, F.layer_norm):
            return self._norm(n, loc)
        if (n.op == "call_function" and t in _POINTWISE_FN) or (n.op == "call_method" and name in _POINTWISE_METHOD):
            return self._pointwise(n)
        raise _NotLocal(f"no local rule for {name}")

    def _need(self, loc) -> Local:
        if not isinstance(loc, Local):
            raise _NotLocal("its sharded operand is not its first argument")
        return loc

    def _reissue(self, n: fx.Node, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """`n`'s op again on `args` (local operands), with its fake value."""
        kwargs = dict(n.kwargs) if kwargs is None else kwargs
        if n.op == "call_function":
            return insert_call(self.g, n.target, args, kwargs)
        method = getattr(torch.Tensor, n.target)
        return insert_call(self.g, method, args, kwargs)

    def _pointwise(self, n: fx.Node) -> Local:
        out_shape = shape(n)
        ndim = len(out_shape)
        layout = None
        for a in n.all_input_nodes:
            loc = self.env.get(a)
            if isinstance(loc, _Pieces):
                raise _NotLocal("a chunk's tuple in a pointwise op")
            if loc is not None:
                d = loc.dim + ndim - len(shape(a))
                key = (d, loc.idx, loc.full)
                if layout is not None and layout != key:
                    raise _NotLocal("operands with different local layouts")
                layout = key
        d, idx, full = layout
        if out_shape[d] != full:
            raise _NotLocal("the output is broadcast along the sharded dim")

        def local_arg(a):
            if not isinstance(a, fx.Node):
                return a
            loc = self.env.get(a)
            if loc is not None:
                return loc.node
            v = val(a)
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                return a
            ad = d - (ndim - v.dim())
            if ad < 0 or v.shape[ad] == 1:
                return a  # broadcast along the sharded dim
            if v.shape[ad] != full:
                raise _NotLocal(f"operand {a.name} of size {v.shape[ad]} along the sharded dim (expected {full} or 1)")
            return self._take(a, ad, idx, full)  # a replicated operand: this rank's part of it

        args = fx.node.map_aggregate(n.args, local_arg)
        kwargs = fx.node.map_aggregate(n.kwargs, local_arg)
        first = next(self.env[a] for a in n.all_input_nodes if a in self.env)
        return first.moved(self._reissue(n, args, kwargs), d, idx, full)

    def _take(self, node: fx.Node, dim: int, idx: tuple[int, ...], full: int) -> fx.Node:
        """node[..., idx, ...] along `dim` (a slice when idx is a run, else index_select)."""
        sl = _as_slice(idx)
        if sl is not None:
            if sl == slice(0, full, 1):
                return node
            return insert_call(self.g, operator.getitem, (node, (slice(None),) * dim + (sl,)))
        const = self._constant(torch.tensor(idx, dtype=torch.long, device=val(node).device))
        return insert_call(self.g, torch.index_select, (node, dim, const))

    def _constant(self, t: torch.Tensor) -> fx.Node:
        from cpcompile.passes.shard_linears import graph_constant

        return graph_constant(self.gm, t, "_cpcompile_local")

    # views ------------------------------------------------------------------------------------
    def _reshape(self, n: fx.Node, loc) -> Local:
        loc = self._need(loc)
        src, dst = shape(loc.node), shape(n)
        full_src = list(src)
        full_src[loc.dim] = loc.full
        k, idx2, full2 = _regroup(tuple(full_src), dst, loc.dim, loc.idx)
        local_dst = list(dst)
        local_dst[k] = len(idx2)
        node = insert_call(self.g, torch.Tensor.reshape, (loc.node, tuple(local_dst)))
        return loc.moved(node, k, idx2, full2)

    def _transpose(self, n: fx.Node, loc) -> Local:
        loc = self._need(loc)
        nd = len(shape(n))
        a, b = (int(x) % nd for x in n.args[1:3])
        d = b if loc.dim == a else a if loc.dim == b else loc.dim
        return loc.moved(insert_call(self.g, torch.transpose, (loc.node, a, b)), d)

    def _permute(self, n: fx.Node, loc) -> Local:
        loc = self._need(loc)
        dims = n.args[1:] if n.op == "call_method" and not isinstance(n.args[1], (list, tuple)) else n.args[1]
        nd = len(shape(n))
        dims = [int(x) % nd for x in dims]
        return loc.moved(insert_call(self.g, torch.permute, (loc.node, dims)), dims.index(loc.dim))

    def _unsqueeze(self, n: fx.Node, loc) -> Local:
        loc = self._need(loc)
        nd = len(shape(n))
        at = int(n.args[1]) % nd
        return loc.moved(insert_call(self.g, torch.unsqueeze, (loc.node, at)), loc.dim + (at <= loc.dim))

    def _expand(self, n: fx.Node, loc) -> Local:
        loc = self._need(loc)
        sizes = list(shape(n))
        d = loc.dim + len(sizes) - len(shape(loc.node))
        if sizes[d] != loc.full:
            raise _NotLocal("expand along the sharded dim")
        sizes[d] = len(loc.idx)
        return loc.moved(insert_call(self.g, torch.Tensor.expand, (loc.node, tuple(sizes))), d)

    # slicing ----------------------------------------------------------------------------------
    def _getitem(self, n: fx.Node) -> Local:
        x, index = n.args
        loc = self.env.get(x)
        if isinstance(loc, _Pieces):
            piece = loc.pieces[index]
            if piece is None:
                raise _NotLocal("a piece of a chunk with no local rule")
            return piece
        loc = self._need(loc)
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
            raise _NotLocal("advanced indexing")
        nd_in = len(shape(x))
        n_ellipsis = sum(i is Ellipsis for i in index)
        used = sum(i is not None and i is not Ellipsis for i in index)
        expanded = []
        for i in index:
            expanded += [slice(None)] * (nd_in - used) if i is Ellipsis else [i]
        if not n_ellipsis:
            expanded += [slice(None)] * (nd_in - used)
        local_index, d_in, d_out, new = [], 0, 0, None
        for i in expanded:
            if i is None:
                local_index.append(None)
                d_out += 1
                continue
            if d_in == loc.dim:
                if not isinstance(i, slice):
                    raise _NotLocal("an integer index on the sharded dim")
                sel = range(loc.full)[i]
                mine = {p: j for j, p in enumerate(loc.idx)}
                kept = [(j, mine[p]) for j, p in enumerate(sel) if p in mine]
                positions = tuple(q for _, q in kept)
                new = (d_out, tuple(j for j, _ in kept), len(sel), positions)
                sl = _as_slice(positions)
                local_index.append(sl if sl is not None else slice(None))
                if sl is None:
                    new = new + ("select",)
            else:
                local_index.append(i)
            if not isinstance(i, int):
                d_out += 1
            d_in += 1
        node = insert_call(self.g, operator.getitem, (loc.node, tuple(local_index)))
        d, idx, full, positions = new[:4]
        if len(new) == 5:  # the local positions are no run: pick them
            node = insert_call(self.g, torch.index_select, (node, d, self._constant(
                torch.tensor(positions, dtype=torch.long, device=val(node).device))))
        return loc.moved(node, d, idx, full)

    def _index_select(self, n: fx.Node, loc) -> Local:
        loc = self._need(loc)
        dim = int(n.args[1]) % len(shape(n))
        index = n.args[2]
        if dim != loc.dim:
            return loc.moved(self._reissue(n, (loc.node,) + tuple(n.args[1:])), loc.dim)
        if index.op != "get_attr":
            raise _NotLocal("index_select on the sharded dim by a computed index")
        sel = getattr(self.gm, index.target).tolist()
        mine = {p: j for j, p in enumerate(loc.idx)}
        kept = [(j, mine[p]) for j, p in enumerate(sel) if p in mine]
        node = self._take(loc.node, dim, tuple(q for _, q in kept), len(loc.idx))
        return loc.moved(node, dim, tuple(j for j, _ in kept), len(sel))

    def _split(self, n: fx.Node, loc) -> _Pieces:
        loc = self._need(loc)
        nd = len(shape(n.args[0]))
        dim = int(n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % nd
        outs = [val(o) for o in val(n)]
        if dim != loc.dim:
            node = self._reissue(n, (loc.node,) + tuple(n.args[1:]))
            pieces = tuple(loc.moved(insert_call(self.g, operator.getitem, (node, i)), loc.dim) for i in range(len(outs)))
            return _Pieces(pieces)
        pieces, start = [], 0
        mine = {p: j for j, p in enumerate(loc.idx)}
        for o in outs:
            width = o.shape[dim]
            kept = [(p - start, mine[p]) for p in range(start, start + width) if p in mine]
            positions = tuple(q for _, q in kept)
            if not positions:
                pieces.append(None)
            else:
                pieces.append(loc.moved(self._take(loc.node, dim, positions, len(loc.idx)), dim,
                                        tuple(j for j, _ in kept), width))
            start += width
        return _Pieces(tuple(pieces))

    def _cat(self, n: fx.Node, stack: bool = False) -> Local:
        """cat along another dim (rotate_half's halves), or stack (a new dim: Cohere's interleaved rotate_half)."""
        tensors = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        dim %= len(shape(n))
        locs = [self.env.get(t) for t in tensors]
        if not all(isinstance(l, Local) for l in locs):
            raise _NotLocal(f"{_name(n)} of a local and a full tensor")
        first = locs[0]
        if any((l.dim, l.idx, l.full) != (first.dim, first.idx, first.full) for l in locs):
            raise _NotLocal(f"{_name(n)} of different layouts")
        if stack:
            node = insert_call(self.g, torch.stack, ([l.node for l in locs], dim))
            return first.moved(node, first.dim + (dim <= first.dim))
        if first.dim == dim:
            raise _NotLocal("cat along the sharded dim")
        node = insert_call(self.g, torch.cat, ([l.node for l in locs], dim))
        return first.moved(node, first.dim)

    # reductions -------------------------------------------------------------------------------
    def _reduce(self, n: fx.Node, loc) -> "Local | _Whole":
        loc = self._need(loc)
        name = _name(n)
        nd_in = len(shape(loc.node))
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if dims is None:
            raise _NotLocal(f"{name} over every dim")
        dims = [int(d) % nd_in for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if loc.dim not in dims:
            d = loc.dim if keepdim else loc.dim - sum(x < loc.dim for x in dims)
            return loc.moved(self._reissue(n, (loc.node,) + tuple(n.args[1:])), d)
        if not is_statistic(n):
            raise _NotLocal(f"{name} over the sharded dim")
        return self._statistic(n, loc, dims[0], keepdim)

    def _statistic(self, n: fx.Node, loc: Local, dim: int, keepdim: bool) -> "_Whole":
        """sum / mean over the sharded dim: local sum, all-reduce over the group, / copies (and / full for mean)."""
        copies = loc.group_size * len(loc.idx) / loc.full  # ranks of the group holding each index
        if copies < 1 or copies != int(copies):  # shard_weights relied on this statistic: never a silent fallback
            raise LayoutError(
                f"cpcompile: {n.name} ({_name(n)} over a sharded dim of {loc.full}) needs its statistic summed over "
                f"the {loc.group} group, but this rank's {len(loc.idx)} indices times {loc.group_size} ranks do not tile "
                f"{loc.full} evenly. Run with tp = cp = 1 and please report this model.")
        s = insert_call(self.g, torch.sum, (loc.node, dim), {"keepdim": keepdim})
        r = insert_call(self.g, _c10d.all_reduce.default, (s, "sum", loc.group_name))
        s = insert_call(self.g, _c10d.wait_tensor.default, (r,))
        divisor = int(copies) * (loc.full if _name(n) == "mean" else 1)
        if divisor != 1:
            s = insert_call(self.g, operator.truediv, (s, divisor))
        self.counts["statistics"] += 1
        return _Whole(s)

    def _norm(self, n: fx.Node, loc) -> Local:
        loc = self._need(loc)
        normalized = n.args[1] if len(n.args) > 1 else n.kwargs["normalized_shape"]
        nd = len(shape(loc.node))
        if loc.dim >= nd - len(tuple(normalized)):
            raise _NotLocal(f"{_name(n)} over the sharded dim")
        return loc.moved(self._reissue(n, (loc.node,) + tuple(n.args[1:])), loc.dim)

    # clean-up ---------------------------------------------------------------------------------
    def _erase_dead(self) -> None:
        """Erase the single-device nodes the local ones replaced, and the pads that fed only them."""
        todo = set(self.env) | self.replaced
        for n in reversed(list(self.g.nodes)):
            if n not in todo or n.users or n.op not in ("call_function", "call_method"):
                continue
            if n.op == "call_method" and n.target.endswith("_") or n.op == "call_function" and n.is_impure():
                continue
            inputs = n.all_input_nodes
            self.g.erase_node(n)
            todo.update(a for a in inputs if a.op == "call_function" and (a.target is F.pad or a.target is torch.Tensor.index_select))

    def _check_statistics(self) -> None:
        """A norm statistic still computed at full width below a surviving pad would read zeros for the
        other ranks' part, and `shard_weights` left those columns out on the promise that this pass sums
        the statistic over the group: refuse, never a silent wrong answer."""
        pads = [n for n in self.env if n.users and n.op == "call_function" and n.target in (F.pad, torch.Tensor.index_select)]
        if not pads:
            return
        stop = lambda m: m.op == "call_function" and m.target in (torch._C._nn.linear, torch.ops.cpcompile.attention_with_lse.default)
        for m in descendants(pads, stop):
            if is_statistic(m) and m.args[0] not in self.env:  # (a statistic of a local input was summed, or is per-shard)
                raise LayoutError(
                    f"cpcompile: {m.name} ({source_line(m)}) reduces over values that stay at the single-device width "
                    "after an op cpcompile cannot keep local; its sum would read zeros for the other ranks' part. "
                    "Run with tp = cp = 1 and please report this model (cpcompile.explain lists what it kept full).")


def _as_slice(idx: tuple[int, ...]) -> slice | None:
    """`idx` as a slice when it is an arithmetic run (step >= 1), else None."""
    if not idx:
        return slice(0, 0, 1)
    if len(idx) == 1:
        return slice(idx[0], idx[0] + 1, 1)
    step = idx[1] - idx[0]
    if step < 1 or any(b - a != step for a, b in zip(idx, idx[1:])):
        return None
    return slice(idx[0], idx[-1] + 1, step)


def _regroup(src: tuple[int, ...], dst: tuple[int, ...], dim: int, idx: tuple[int, ...]) -> tuple[int, tuple[int, ...], int]:
    """A reshape `src -> dst` of a tensor sharded along `src[dim]` at `idx`: the output dim, indices and full
    size of the same element set, if it is a product set sharded along one output dim (whole heads)."""
    i = j = 0  # walk both shapes in groups of dims whose sizes multiply to the same number
    while True:
        i0, j0, p, q = i, j, 1, 1
        if i < len(src):
            p, i = src[i], i + 1
        if j < len(dst):
            q, j = dst[j], j + 1
        while p != q:
            if p < q:
                p, i = p * src[i], i + 1
            else:
                q, j = q * dst[j], j + 1
        if i0 <= dim < i:
            break
        if i >= len(src):
            raise _NotLocal("reshape: the sharded dim not found")
    gsrc, gdst = src[i0:i], dst[j0:j]
    if math.prod(gsrc) > 1 << 24:
        raise _NotLocal("reshape mixing the sharded dim with a large group")
    mask = torch.zeros(gsrc, dtype=torch.bool)
    sel = torch.zeros(src[dim], dtype=torch.bool)
    sel[list(idx)] = True
    view = [1] * len(gsrc)
    view[dim - i0] = src[dim]
    mask |= sel.view(view)
    mask = mask.reshape(gdst)
    for k in range(len(gdst)):
        other = [x for x in range(len(gdst)) if x != k]
        along = mask.all(dim=other) if other else mask
        if torch.equal(mask, along.view([gdst[k] if x == k else 1 for x in range(len(gdst))]).expand(gdst)):
            if along.all() and len(idx) != src[dim]:
                continue
            return j0 + k, tuple(along.nonzero().flatten().tolist()), gdst[k]
    raise _NotLocal(f"reshape {src} -> {dst} splits the shard across dims (not whole heads)")


@dataclass(frozen=True)
class _Whole:
    """The single-device value itself, held whole by every rank (an all-reduced statistic)."""

    node: fx.Node

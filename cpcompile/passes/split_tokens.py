"""Pass 6 — split_tokens: where the tokens live outside attention (`ffn='sp'` and `ffn='world_tp'`).

Dynamo traces every hidden state as `[B, L, *f]`: all tokens of this replica on every rank
(layout FULL). The two FFN schemes of DESIGN.md section 3 change that outside attention:

  * `ffn='sp'` (TensorRT-LLM's ADP + Helix token split), layout CHUNK `[1, Tc, *f]` with
    `Tc = ceil(B*L / cp)`: this CP rank's run of the flattened tokens, zero padded at the end.
    - the embedding output is sliced to this rank's chunk (no communication);
    - o_proj's all-reduce becomes a reduce-scatter over the CP group (then an all-reduce over the
      tp group when tp > 1): the sum over the replica, leaving this rank its chunk;
    - the residual stream, norms and FFN run on the chunk (FFN tensor-parallel over tp only);
    - a consumer that needs every token (the q/k/v projections, the LM head's token slice, any
      op this pass does not know to be token-wise) gets an all-gather over the CP group.
  * `ffn='world_tp'` (dp > 1), layout GATHERED `[1, D*Tmax, *f]`: the tokens of every replica,
    each padded to the largest count `Tmax` (the counts come from the `replica_layout` marker,
    so replicas with different batches and prompt lengths agree on one static shape).
    - the FFN input is all-gathered over the dp group;
    - the FFN runs on all tokens with 1/world of its weights (column/row over every rank);
    - down's all-reduce becomes a reduce-scatter over the dp group (then an all-reduce over the
      replica) and the replica's own tokens are taken back.

Token-wise ops (what may run on a CHUNK / GATHERED value): pointwise ops (by ATen's `pointwise`
tag), reductions / norms / softmax / chunk / pad / index_select over feature dims only,
`linear`, casts and eval-mode dropout. Operands that do not vary over tokens (weights,
scalars) broadcast as before; a FULL token-shaped operand is sliced to the chunk (sp). Anything
else takes the safe path under sp (all-gather first) and is an error under world_tp: the pass
never leaves a mixed layout, so it cannot be silently wrong.

Before (sp, cp=2, a Llama layer's tail; B*L = 5 tokens, Tc = 3):
    o = wait_tensor(all_reduce(linear(attn, w_o), 'sum', replica))
    h = inputs_embeds + o;  ...rms_norm(h)...;  down = wait_tensor(all_reduce(linear(...)))
After:
    e = pad(inputs_embeds.flatten(0, 1), (0, 0, 0, 1))[3:6].unsqueeze(0)          # [1, 3, H]
    o = wait_tensor(reduce_scatter_tensor(pad(linear(attn, w_o).flatten(0, 1), ...), 'sum', 2, cp)).unsqueeze(0)
    h = e + o;  ...rms_norm(h)...  (all on [1, 3, H]);  down = linear(...) (replicated FFN at tp=1)
    q_in = wait_tensor(all_gather_into_tensor(x.squeeze(0), 2, cp))[:5].reshape(1, 5, H)
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx

from cpcompile.passes._fx import erase_unused, insert_call, is_op, shape, val
from cpcompile.passes.plan import ATTENTION_INPUT_ROLES, FFN_COLUMN_ROLES, Placement

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext

_c10d = torch.ops._c10d_functional

FULL, CHUNK, GATHERED = "full", "chunk", "gathered"

# ops that act on each token on its own when their dims are feature dims (checked per node)
_IDENTITY_LIKE = {"to", "type", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach", "dropout"}
_REDUCE_DIM1 = {"mean", "sum", "amax", "amin", "var", "std", "softmax", "log_softmax", "logsumexp", "argmax", "argmin",
                "index_select", "narrow"}
_REDUCE_DIM2 = {"chunk", "split", "topk", "norm"}
_NORMS = {"layer_norm", "rms_norm"}
_NAME_ALIASES = {"truediv": "div", "floordiv": "floor_divide", "and_": "bitwise_and", "or_": "bitwise_or", "invert": "bitwise_not"}


class TokenSplitError(ValueError):
    """The token layout cannot be carried through an op (world_tp); the message names it."""


def split_tokens(gm: fx.GraphModule, placements: list[Placement], ctx: "RankContext", tokens: list[int] | None = None) -> dict[str, int]:
    """Rewrite `gm`'s token layout for `ctx.ffn` ('sp' | 'world_tp'); returns counts of what was inserted.
    `placements`: the plan (`Analysis.placements`), for each projection's role.
    `tokens` (world_tp): the tokens of every replica in this graph (its `replica_layout` marker)."""
    return _Splitter(gm, {p.weight: p.role for p in placements}, ctx, tokens).run()


def _name(node: fx.Node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    name = name.strip("_")
    return _NAME_ALIASES.get(name, name)


def _aten_pointwise(name: str) -> bool:
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        return False
    try:
        return any(torch.Tag.pointwise in getattr(op, o).tags for o in op.overloads())
    except (AttributeError, RuntimeError):
        return False


def _feature_dims(dims, ndim: int) -> bool:
    """True when every dim in `dims` is a feature dim (not 0 or 1, the token dims)."""
    if dims is None:
        return False
    dims = dims if isinstance(dims, (list, tuple)) else (dims,)
    return all(isinstance(d, int) and (d if d >= 0 else d + ndim) >= 2 for d in dims)


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` (counting the tensor as 0, for functions and methods alike) or keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Splitter:
    def __init__(self, gm: fx.GraphModule, roles: dict[str, str], ctx: "RankContext", tokens: list[int] | None):
        self.gm, self.g, self.roles, self.ctx, self.tokens = gm, gm.graph, roles, ctx, tokens
        self.layout: dict[fx.Node, str] = {}
        self.full_shape: dict[fx.Node, tuple] = {}  # split node -> the [B, L, *f] it stands for
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.sliced: dict[fx.Node, fx.Node] = {}
        self.counts = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0, "slices": 0}
        if ctx.ffn == "sp":
            self.parts, self.index, self.group = ctx.cp, ctx.cp_rank, ctx.name("cp")
            self.kind = CHUNK
        else:
            self.parts, self.index, self.group = ctx.dp, ctx.dp_rank, ctx.name("dp")
            self.kind = GATHERED
        self.skip = self._row_chains()

    # ---- the walk -------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        dead: list[fx.Node] = []
        for n in list(self.g.nodes):
            if n in self.skip:
                continue
            row = n.meta.get("cpcompile_row")
            if row is not None and self._reshard_row(n, row):
                dead.append(n)
                continue
            if n.op == "output":
                self._output(n)
                continue
            if self.ctx.ffn == "sp" and self._is_embedding(n):
                self._start_chunk(n)
                continue
            if self.ctx.ffn == "world_tp" and self._role(n) in FFN_COLUMN_ROLES:
                self._gather_ffn_input(n)
                continue
            self._propagate(n)
        for n in dead:  # the replaced all-reduce chains: y [+ bias], wait, all_reduce
            erase_unused(self.g, n)
        self.g.lint()
        self.gm.recompile()
        return self.counts

    def _propagate(self, n: fx.Node) -> None:
        split_in = [i for i in n.all_input_nodes if self.layout.get(i, FULL) != FULL]
        if not split_in:
            return
        if self._tokenwise(n) and self._operands_ok(n):
            self._refresh(n)
            self.layout[n] = self.kind
            self.full_shape[n] = self._traced_full(n)
            return
        if self.kind == GATHERED:
            raise TokenSplitError(
                f"ffn='world_tp': {n.format_node()} consumes the gathered tokens of all replicas but is not a "
                "token-wise op cpcompile can run on them (inside the FFN only pointwise ops, feature-dim "
                "reductions and linears are). Use ffn='tp' for this model."
            )
        for i in split_in:
            n.replace_input_with(i, self._gather(i))

    # ---- token-wise ops -------------------------------------------------------------------
    def _tokenwise(self, n: fx.Node) -> bool:
        if n.op not in ("call_function", "call_method"):
            return False
        name = _name(n)
        if is_op(n, "linear"):
            return self._role(n) not in ATTENTION_INPUT_ROLES + ("lm_head",)
        if name == "getitem":
            src = n.args[0]
            if isinstance(val(src), (tuple, list)):  # chunk/split outputs
                return isinstance(n.args[1], int)
            idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
            if idx and idx[0] is Ellipsis:
                return all(isinstance(i, (slice, int)) for i in idx[1:]) and len(idx) - 1 <= len(shape(src)) - 2
            return len(idx) >= 2 and idx[0] == slice(None) and idx[1] == slice(None) and None not in idx[2:]
        ndim = len(shape(next(i for i in n.all_input_nodes if self.layout.get(i, FULL) != FULL)))
        if n.target is _c10d.all_reduce.default:  # FFN down over tp (sp): the tp group shares this chunk
            return self.kind == CHUNK and n.args[2] == self.ctx.group_names.get("tp")
        if n.target is _c10d.wait_tensor.default:
            return True
        if name in _IDENTITY_LIKE:
            return name != "dropout" or not _arg(n, 2, "training", True) or _arg(n, 1, "p", 0.5) == 0
        if name in _REDUCE_DIM1:
            return _feature_dims(_arg(n, 1, "dim"), ndim)
        if name in _REDUCE_DIM2:
            default = -1 if name == "topk" else (0 if name in ("chunk", "split") else None)
            return _feature_dims(_arg(n, 2, "dim", default), ndim)
        if name in _NORMS:
            ns = _arg(n, 1, "normalized_shape")
            return isinstance(ns, (list, tuple)) and len(ns) <= ndim - 2
        if name == "pad":
            pad = _arg(n, 1, "pad")
            return isinstance(pad, (list, tuple)) and len(pad) <= 2 * (ndim - 2)
        return _aten_pointwise(name)

    def _operands_ok(self, n: fx.Node) -> bool:
        """Every FULL tensor operand either does not vary over tokens or is sliced to the chunk."""
        if not _aten_pointwise(_name(n)):
            return True  # linear / norms / reductions: their other tensor inputs are weights
        out_ndim = len(shape(n)) if not isinstance(val(n), (tuple, list)) else None
        src = next(i for i in n.all_input_nodes if self.layout.get(i, FULL) != FULL)
        for i in n.all_input_nodes:
            if self.layout.get(i, FULL) != FULL or not isinstance(val(i), torch.Tensor):
                continue
            s = shape(i)
            nd = out_ndim if out_ndim is not None else len(s)
            padded = (1,) * (nd - len(s)) + s
            if nd < 2 or len(s) > nd or padded[:2] == (1, 1):
                continue  # broadcasts over the tokens: a weight, a scalar, a per-feature constant
            if self.kind == GATHERED:
                return False
            n.replace_input_with(i, self._slice(i, padded, self.full_shape[src][:2], before=n))
        return True

    # ---- sources and sinks ----------------------------------------------------------------
    def _is_embedding(self, n: fx.Node) -> bool:
        """The replica's embedding output (a vocab-parallel lookup's all-reduce is resharded instead)."""
        return (n.op == "call_function" and n.target in (F.embedding, torch.embedding) and len(shape(n)) == 3
                and not n.meta.get("cpcompile_local_embedding"))

    def _start_chunk(self, n: fx.Node) -> None:
        users = list(n.users)
        chunk = self._slice(n, shape(n), shape(n)[:2], before=n.next)
        for u in users:
            u.replace_input_with(n, chunk)

    def _gather_ffn_input(self, lin: fx.Node) -> None:
        x = lin.args[0]
        if self.layout.get(x, FULL) == FULL:
            if x not in self.gathered:
                with self.g.inserting_before(x.next):
                    self.gathered[x] = self._gather_replicas(x)
            lin.replace_input_with(x, self.gathered[x])
        self._propagate(lin)

    def _output(self, n: fx.Node) -> None:
        for i in [i for i in n.all_input_nodes if self.layout.get(i, FULL) != FULL]:
            if self.kind == GATHERED:
                raise TokenSplitError(f"ffn='world_tp': the gathered tokens of {i.name} reach the graph output")
            n.replace_input_with(i, self._gather(i))

    def _reshard_row(self, y: fx.Node, row: dict) -> bool:
        """o (sp) / down (world_tp): replace the all-reduce after the partial sum by a reduce-scatter."""
        role = self.roles.get(row["weight"])
        partial = row["partial"]
        if not self._reshards(row):
            return False
        if self.ctx.ffn == "sp":
            full = shape(partial)
            with self.g.inserting_before(y):
                flat = self._flat_padded(partial, full, self.parts * self._chunk_len(full))
                out = self._wait(insert_call(self.g, _c10d.reduce_scatter_tensor.default, (flat, "sum", self.parts, self.group)))
                self.counts["reduce_scatter"] += 1
                out = insert_call(self.g, torch.unsqueeze, (out, 0))
                if self.ctx.tp > 1:
                    out = self._all_reduce(out, "tp")
                if row["bias"] is not None:
                    out = insert_call(self.g, operator.add, (out, row["bias"]))
            self.layout[out], self.full_shape[out] = CHUNK, full
        else:
            if self.layout.get(partial, FULL) != GATHERED:
                raise TokenSplitError(f"ffn='world_tp': {row['weight']} ({role}) is row-parallel over all ranks but its input is not the gathered FFN tokens")
            full = self.full_shape[partial]
            t_max = max(self.tokens)
            with self.g.inserting_before(y):
                flat = insert_call(self.g, torch.squeeze, (partial, 0))
                out = self._wait(insert_call(self.g, _c10d.reduce_scatter_tensor.default, (flat, "sum", self.parts, self.group)))
                self.counts["reduce_scatter"] += 1
                if self.ctx.tp * self.ctx.cp > 1:
                    out = self._all_reduce(out, "replica")
                mine = self.tokens[self.index]
                if mine != t_max:
                    out = insert_call(self.g, operator.getitem, (out, slice(0, mine)))
                out = insert_call(self.g, torch.reshape, (out, full))
                if row["bias"] is not None:
                    out = insert_call(self.g, operator.add, (out, row["bias"]))
            self.layout[out] = FULL
        y.replace_all_uses_with(out)
        return True

    def _reshards(self, row: dict) -> bool:
        if self.ctx.ffn == "sp":
            role = row.get("role") or self.roles.get(row["weight"])
            return role in ("o", "embedding") and row["group"] == "replica"
        return row["group"] == "world"

    # ---- layout changes -------------------------------------------------------------------
    def _chunk_len(self, full: tuple) -> int:
        t = full[0] * full[1]
        return -(-t // self.parts)

    def _flat_padded(self, x: fx.Node, full: tuple, length: int) -> fx.Node:
        flat = insert_call(self.g, torch.flatten, (x, 0, 1))
        t = full[0] * full[1]
        if length > t:
            flat = insert_call(self.g, F.pad, (flat, (0, 0) * (len(full) - 2) + (0, length - t)))
        return flat

    def _slice(self, x: fx.Node, padded: tuple, tokens: tuple, before: fx.Node) -> fx.Node:
        """FULL -> CHUNK (sp): this CP rank's run of the flattened, padded tokens (`tokens` = (B, L))."""
        if x in self.sliced:
            return self.sliced[x]
        full = tuple(tokens) + tuple(padded[2:])
        with self.g.inserting_before(before):
            src = x
            if tuple(shape(x)) != full:
                src = insert_call(self.g, torch.Tensor.expand, (insert_call(self.g, torch.reshape, (x, padded)), full))
            tc = self._chunk_len(full)
            flat = self._flat_padded(src, full, tc * self.parts)
            part = insert_call(self.g, operator.getitem, (flat, slice(self.index * tc, (self.index + 1) * tc)))
            chunk = insert_call(self.g, torch.unsqueeze, (part, 0))
        self.counts["slices"] += 1
        self.layout[chunk], self.full_shape[chunk] = CHUNK, full
        self.sliced[x] = chunk
        return chunk

    def _gather(self, x: fx.Node) -> fx.Node:
        """CHUNK -> FULL (sp): all-gather over the CP group, drop the padding, restore [B, L, *f]."""
        if x in self.gathered:
            return self.gathered[x]
        full = self.full_shape[x]
        with self.g.inserting_before(x.next):
            flat = insert_call(self.g, torch.squeeze, (x, 0))
            allg = self._wait(insert_call(self.g, _c10d.all_gather_into_tensor.default, (flat, self.parts, self.group)))
            t = full[0] * full[1]
            if shape(allg)[0] != t:
                allg = insert_call(self.g, operator.getitem, (allg, slice(0, t)))
            out = insert_call(self.g, torch.reshape, (allg, full))
        self.counts["all_gather"] += 1
        self.gathered[x] = out
        return out

    def _gather_replicas(self, x: fx.Node) -> fx.Node:
        """FULL -> GATHERED (world_tp): every replica's tokens, each padded to the largest count."""
        full = shape(x)
        tokens = self.tokens
        if tokens is None or len(tokens) != self.parts or tokens[self.index] != full[0] * full[1]:
            raise TokenSplitError(
                f"ffn='world_tp': this replica has {full[0] * full[1]} tokens but the replica layout says {tokens}"
            )
        flat = self._flat_padded(x, full, max(tokens))
        allg = self._wait(insert_call(self.g, _c10d.all_gather_into_tensor.default, (flat, self.parts, self.group)))
        out = insert_call(self.g, torch.unsqueeze, (allg, 0))
        self.counts["all_gather"] += 1
        self.layout[out], self.full_shape[out] = GATHERED, full
        return out

    # ---- helpers --------------------------------------------------------------------------
    def _wait(self, x: fx.Node) -> fx.Node:
        return insert_call(self.g, _c10d.wait_tensor.default, (x,))

    def _all_reduce(self, x: fx.Node, group: str) -> fx.Node:
        self.counts["all_reduce"] += 1
        return self._wait(insert_call(self.g, _c10d.all_reduce.default, (x, "sum", self.ctx.name(group))))

    def _role(self, n: fx.Node) -> str | None:
        if not is_op(n, "linear"):
            return None
        return self.roles.get(n.meta.get("cpcompile_weight"))

    def _row_chains(self) -> set[fx.Node]:
        """The all-reduce chains (all_reduce, wait [, + bias]) after each row partial sum: replaced
        as a whole by `_reshard_row`, so the walk does not look inside them."""
        out = set()
        for y in self.g.nodes:
            row = y.meta.get("cpcompile_row")
            if row is None or not self._reshards(row):
                continue
            todo = [i for i in y.all_input_nodes]
            while todo:
                n = todo.pop()
                if n is row["partial"] or n is row["bias"] or n in out:
                    continue
                out.add(n)
                todo += n.all_input_nodes
        return out

    def _traced_full(self, n: fx.Node) -> tuple | None:
        src = next(i for i in n.all_input_nodes if self.layout.get(i, FULL) != FULL)
        if isinstance(val(n), (tuple, list)):
            return self.full_shape[src]
        s = shape(n)
        return self.full_shape[src][:2] + tuple(s[2:])

    def _refresh(self, n: fx.Node) -> None:
        """Recompute `n`'s fake value for its new (split) inputs."""
        args = fx.node.map_arg(n.args, val)
        kwargs = fx.node.map_arg(n.kwargs, val)
        fake = next(v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if hasattr(v, "fake_mode"))
        with fake.fake_mode:
            out = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" else n.target(*args, **kwargs)
        n.meta["val"] = n.meta["example_value"] = out

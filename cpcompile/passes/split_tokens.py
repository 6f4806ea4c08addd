"""Pass 6 — split_tokens: where the tokens live outside attention (`ffn='sp'` and `ffn='world_tp'`).

Dynamo traces every hidden state as `[B, L, *f]`: all tokens of this replica on every rank
(layout FULL). The two FFN schemes of DESIGN.md section 3 change that outside attention:

  * `ffn='sp'` (TensorRT-LLM's ADP + Helix token split), layout CHUNK `[1, Tc, *f]` with
    `Tc = ceil(B*L / cp)`: this CP rank's run of the flattened tokens, zero padded at the end
    (split_tokens_sp.py).
  * `ffn='world_tp'` (dp > 1), layout GATHERED `[1, D*Tmax, *f]`: the tokens of every replica,
    each padded to the largest count `Tmax` (the counts come from the `replica_layout` marker,
    so replicas with different batches and prompt lengths agree on one static shape)
    (split_tokens_world_tp.py).

This module holds the walk both share (`TokenSplitter`): each node whose input is split either
runs on the split value (token-wise, tokenwise.py) or is handed to its scheme; the row-parallel
all-reduce chains are resharded as a whole. Each scheme is a subclass that says where the split
layout starts, how a row partial sum is resharded and what a consumer that needs every token gets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx

from cpcompile.passes._fx import erase_unused, insert_call, is_op, shape, val
from cpcompile.passes.plan import Placement
from cpcompile.passes.tokenwise import aten_pointwise, is_tokenwise, op_name, output_ndim, token_shaped

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext

_c10d = torch.ops._c10d_functional

FULL, CHUNK, GATHERED = "full", "chunk", "gathered"


class TokenSplitError(ValueError):
    """The token layout cannot be carried through an op (world_tp); the message names it."""


def split_tokens(gm: fx.GraphModule, placements: list[Placement], ctx: "RankContext", tokens: list[int] | None = None) -> dict[str, int]:
    """Rewrite `gm`'s token layout for `ctx.ffn` ('sp' | 'world_tp'); returns counts of what was inserted.
    `placements`: the plan (`Analysis.placements`), for each projection's role.
    `tokens` (world_tp): the tokens of every replica in this graph (its `replica_layout` marker)."""
    # the schemes subclass TokenSplitter (defined below), so they are imported here, not at the top
    from cpcompile.passes.split_tokens_sp import SequenceSplit
    from cpcompile.passes.split_tokens_world_tp import WorldGather

    scheme = SequenceSplit if ctx.ffn == "sp" else WorldGather
    return scheme(gm, {p.weight: p.role for p in placements}, ctx, tokens).run()


class TokenSplitter(ABC):
    """The walk both schemes share; a subclass sets `kind` (its split layout) and the scheme hooks
    `_split_group`, `_source`, `_reshards`, `_reshard`, `_token_operand`, `_not_tokenwise`, `_output`."""

    kind: str

    def __init__(self, gm: fx.GraphModule, roles: dict[str, str], ctx: "RankContext", tokens: list[int] | None):
        self.gm, self.g, self.roles, self.ctx, self.tokens = gm, gm.graph, roles, ctx, tokens
        self.layout: dict[fx.Node, str] = {}
        self.full_shape: dict[fx.Node, tuple] = {}  # split node -> the [B, L, *f] it stands for
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.counts = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0, "slices": 0}
        self.parts, self.index, self.group = self._split_group()
        self.skip = self._row_chains()

    # ---- scheme hooks ---------------------------------------------------------------------
    @abstractmethod
    def _split_group(self) -> tuple[int, int, str]:
        """(parts, this rank's index, group name) of the group the tokens are split over."""

    @abstractmethod
    def _source(self, n: fx.Node) -> bool:
        """Where the split layout starts: rewrite `n` and return True, or return False."""

    @abstractmethod
    def _reshards(self, row: dict) -> bool:
        """Whether this row partial sum's all-reduce chain is resharded by `_reshard`."""

    @abstractmethod
    def _reshard(self, y: fx.Node, row: dict) -> fx.Node:
        """The replacement for `y`, the end of a row all-reduce chain (inserted before `y`)."""

    @abstractmethod
    def _token_operand(self, n: fx.Node, i: fx.Node, padded: tuple, src: fx.Node) -> bool:
        """A FULL operand `i` of token-wise `n` varies over the tokens: fix it up, or return False."""

    @abstractmethod
    def _not_tokenwise(self, n: fx.Node, split_in: list[fx.Node]) -> None:
        """`n` consumes the split `split_in` but is not token-wise."""

    @abstractmethod
    def _output(self, n: fx.Node) -> None:
        """The graph output `n`, some of whose inputs may be split."""

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
            if self._source(n):
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
        self._not_tokenwise(n, split_in)

    def _reshard_row(self, y: fx.Node, row: dict) -> bool:
        """o (sp) / down (world_tp): replace the all-reduce after the partial sum by a reduce-scatter."""
        if not self._reshards(row):
            return False
        out = self._reshard(y, row)
        y.replace_all_uses_with(out)
        return True

    # ---- token-wise ops -------------------------------------------------------------------
    def _tokenwise(self, n: fx.Node) -> bool:
        src = next(i for i in n.all_input_nodes if self.layout.get(i, FULL) != FULL)
        return is_tokenwise(n, src, self._role(n), self.kind == CHUNK, self.ctx.group_names.get("tp"))

    def _operands_ok(self, n: fx.Node) -> bool:
        """Every FULL tensor operand either does not vary over tokens or is sliced to the chunk."""
        if not aten_pointwise(op_name(n)):
            return True  # linear / norms / reductions: their other tensor inputs are weights
        out_ndim = output_ndim(n)
        src = next(i for i in n.all_input_nodes if self.layout.get(i, FULL) != FULL)
        for i in n.all_input_nodes:
            if self.layout.get(i, FULL) != FULL:
                continue
            padded = token_shaped(i, out_ndim)
            if padded is None:
                continue  # broadcasts over the tokens: a weight, a scalar, a per-feature constant
            if not self._token_operand(n, i, padded, src):
                return False
        return True

    # ---- helpers --------------------------------------------------------------------------
    def _flat_padded(self, x: fx.Node, full: tuple, length: int) -> fx.Node:
        flat = insert_call(self.g, torch.flatten, (x, 0, 1))
        t = full[0] * full[1]
        if length > t:
            flat = insert_call(self.g, F.pad, (flat, (0, 0) * (len(full) - 2) + (0, length - t)))
        return flat

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

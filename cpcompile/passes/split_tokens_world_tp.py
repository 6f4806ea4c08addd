"""split_tokens, `ffn='world_tp'` (dp > 1): the FFN over every rank, on the tokens of every replica.

Layout GATHERED `[1, D*Tmax, *f]`: the tokens of every replica, each padded to the largest count
`Tmax` (the counts come from the `replica_layout` marker, so replicas with different batches and
prompt lengths agree on one static shape).

Cases handled:
    - the FFN input is all-gathered over the dp group;
    - the FFN runs on all tokens with 1/world of its weights (column/row over every rank);
    - down's all-reduce becomes a reduce-scatter over the dp group (then an all-reduce over the
      replica) and the replica's own tokens are taken back.
An op on the gathered tokens that is not token-wise (tokenwise.py), or gathered tokens reaching
the graph output, is a TokenSplitError: the pass never leaves a mixed layout.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from cpcompile.passes._fx import insert_call, shape
from cpcompile.passes.plan import FFN_COLUMN_ROLES
from cpcompile.passes.split_tokens import FULL, GATHERED, TokenSplitError, TokenSplitter

_c10d = torch.ops._c10d_functional


class WorldGather(TokenSplitter):
    kind = GATHERED

    def _split_group(self) -> tuple[int, int, str]:
        return self.ctx.dp, self.ctx.dp_rank, self.ctx.name("dp")

    # ---- sources and sinks ----------------------------------------------------------------
    def _source(self, n: fx.Node) -> bool:
        if self._role(n) in FFN_COLUMN_ROLES:
            self._gather_ffn_input(n)
            return True
        return False

    def _gather_ffn_input(self, lin: fx.Node) -> None:
        x = lin.args[0]
        if self.layout.get(x, FULL) == FULL:
            if x not in self.gathered:
                with self.g.inserting_before(x.next):
                    self.gathered[x] = self._gather_replicas(x)
            lin.replace_input_with(x, self.gathered[x])
        self._propagate(lin)

    def _token_operand(self, n: fx.Node, i: fx.Node, padded: tuple, src: fx.Node) -> bool:
        return False

    def _not_tokenwise(self, n: fx.Node, split_in: list[fx.Node]) -> None:
        raise TokenSplitError(
            f"ffn='world_tp': {n.format_node()} consumes the gathered tokens of all replicas but is not a "
            "token-wise op cpcompile can run on them (inside the FFN only pointwise ops, feature-dim "
            "reductions and linears are). Use ffn='tp' for this model."
        )

    def _output(self, n: fx.Node) -> None:
        for i in [i for i in n.all_input_nodes if self.layout.get(i, FULL) != FULL]:
            raise TokenSplitError(f"ffn='world_tp': the gathered tokens of {i.name} reach the graph output")

    def _reshard(self, y: fx.Node, row: dict) -> fx.Node:
        """down: the all-reduce after the partial sum becomes a reduce-scatter over the dp group."""
        role = self.roles.get(row["weight"])
        partial = row["partial"]
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
        return out

    def _reshards(self, row: dict) -> bool:
        return row["group"] == "world"

    # ---- layout changes -------------------------------------------------------------------
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

"""split_tokens, `ffn='sp'` (TensorRT-LLM's ADP + Helix token split): the tokens split over the CP group.

Layout CHUNK `[1, Tc, *f]` with `Tc = ceil(B*L / cp)`: this CP rank's run of the flattened tokens,
zero padded at the end.

Cases handled:
    - the embedding output is sliced to this rank's chunk (no communication);
    - o_proj's all-reduce becomes a reduce-scatter over the CP group (then an all-reduce over the
      tp group when tp > 1): the sum over the replica, leaving this rank its chunk;
    - the residual stream, norms and FFN run on the chunk (FFN tensor-parallel over tp only);
    - a consumer that needs every token (the q/k/v projections, the LM head's token slice, any
      op this pass does not know to be token-wise) gets an all-gather over the CP group.

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

from cpcompile.passes._fx import insert_call, shape
from cpcompile.passes.split_tokens import CHUNK, FULL, TokenSplitter

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext

_c10d = torch.ops._c10d_functional


class SequenceSplit(TokenSplitter):
    kind = CHUNK

    def __init__(self, gm: fx.GraphModule, roles: dict[str, str], ctx: "RankContext", tokens: list[int] | None):
        super().__init__(gm, roles, ctx, tokens)
        self.sliced: dict[fx.Node, fx.Node] = {}

    def _split_group(self) -> tuple[int, int, str]:
        return self.ctx.cp, self.ctx.cp_rank, self.ctx.name("cp")

    # ---- sources and sinks ----------------------------------------------------------------
    def _source(self, n: fx.Node) -> bool:
        if self._is_embedding(n):
            self._start_chunk(n)
            return True
        return False

    def _is_embedding(self, n: fx.Node) -> bool:
        """The replica's embedding output (a vocab-parallel lookup's all-reduce is resharded instead)."""
        return (n.op == "call_function" and n.target in (F.embedding, torch.embedding) and len(shape(n)) == 3
                and not n.meta.get("cpcompile_local_embedding"))

    def _start_chunk(self, n: fx.Node) -> None:
        users = list(n.users)
        chunk = self._slice(n, shape(n), shape(n)[:2], before=n.next)
        for u in users:
            u.replace_input_with(n, chunk)

    def _token_operand(self, n: fx.Node, i: fx.Node, padded: tuple, src: fx.Node) -> bool:
        n.replace_input_with(i, self._slice(i, padded, self.full_shape[src][:2], before=n))
        return True

    def _not_tokenwise(self, n: fx.Node, split_in: list[fx.Node]) -> None:
        for i in split_in:
            n.replace_input_with(i, self._gather(i))

    def _output(self, n: fx.Node) -> None:
        for i in [i for i in n.all_input_nodes if self.layout.get(i, FULL) != FULL]:
            n.replace_input_with(i, self._gather(i))

    def _reshard(self, y: fx.Node, row: dict) -> fx.Node:
        """o: the all-reduce after the partial sum becomes a reduce-scatter over the CP group."""
        partial = row["partial"]
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
        return out

    def _reshards(self, row: dict) -> bool:
        role = row.get("role") or self.roles.get(row["weight"])
        return role in ("o", "embedding") and row["group"] == "replica"

    # ---- layout changes -------------------------------------------------------------------
    def _chunk_len(self, full: tuple) -> int:
        t = full[0] * full[1]
        return -(-t // self.parts)

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

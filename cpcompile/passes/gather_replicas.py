"""Pass 7 — gather_replicas: attention data parallel's batch layout (dp > 1).

Under attention DP each replica runs the graph on its own rows. The forward wrapper
(`cpcompile.data_parallel`) passes the layout of this step into the graph through the marker
op `cpcompile::replica_layout(x, rows, tokens)`: the rows and tokens of every replica, as
constants Dynamo guards on (a new layout compiles a new graph; decode steps reuse theirs).

Cases handled:
  * the marker is removed (its input takes its place); `split_tokens` reads `tokens` from it
    under ffn='world_tp' (see `replica_layout`).
  * dp_inputs='global': every floating output whose dim 0 is this replica's rows (the logits)
    is padded to the largest replica's rows, all-gathered over the dp group, and the real rows
    are taken back in order, so every rank returns the whole batch. Ragged splits (B % dp != 0)
    are the reason for the padding.
  * dp_inputs='local': outputs stay this replica's.

Before (dp=2, B=3: replica 0 has rows 0-1, replica 1 row 2):
    ids = cpcompile.replica_layout(l_input_ids, [2, 1], [2, 1]); ...; return (logits,)
After (on replica 1):
    ...(l_input_ids)...; p = pad(logits, (0, 0, 0, 0, 0, 1))
    a = wait_tensor(all_gather_into_tensor(p, 2, dp)); return (torch.cat([a[0:2], a[2:3]], 0),)
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx

from cpcompile.data_parallel import REPLICA_LAYOUT
from cpcompile.passes._fx import insert_call, shape, val

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext

_c10d = torch.ops._c10d_functional


def replica_layout(gm: fx.GraphModule) -> tuple[list[int], list[int]] | None:
    """(rows, tokens) of every replica, from the graph's marker; None if it has none."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is REPLICA_LAYOUT:
            return list(n.args[1]), list(n.args[2])
    return None


def gather_replicas(gm: fx.GraphModule, ctx: "RankContext", gather_outputs: bool) -> dict[str, int]:
    """Remove the layout marker; in global mode all-gather the outputs over `ctx`'s dp group. Returns counts."""
    dp_rank, dp_group = ctx.dp_rank, ctx.name("dp")
    g = gm.graph
    layout = None
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is REPLICA_LAYOUT:
            layout = (list(n.args[1]), list(n.args[2]))
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    counts = {"all_gather": 0}
    if gather_outputs:
        if layout is None:
            raise ValueError("gather_replicas: dp_inputs='global' graph has no replica_layout marker")
        rows = layout[0]
        out = next(n for n in g.nodes if n.op == "output")
        done: dict[fx.Node, fx.Node] = {}

        def gather(x):
            if not isinstance(x, fx.Node) or not isinstance(v := val(x), torch.Tensor):
                return x
            if not v.is_floating_point() or v.dim() == 0 or shape(x)[0] != rows[dp_rank]:
                return x
            if x not in done:
                with g.inserting_before(out):
                    done[x] = _gather_rows(g, x, rows, dp_rank, dp_group)
                counts["all_gather"] += 1
            return done[x]

        out.args = fx.node.map_aggregate(out.args, gather)
    g.lint()
    gm.recompile()
    return counts


def _gather_rows(g: fx.Graph, x: fx.Node, rows: list[int], dp_rank: int, dp_group: str) -> fx.Node:
    most = max(rows)
    s = shape(x)
    if s[0] < most:
        x = insert_call(g, F.pad, (x, (0, 0) * (len(s) - 1) + (0, most - s[0])))
    allg = insert_call(g, _c10d.wait_tensor.default, (insert_call(g, _c10d.all_gather_into_tensor.default, (x, len(rows), dp_group)),))
    if all(r == most for r in rows):
        return allg
    parts = [insert_call(g, operator.getitem, (allg, slice(d * most, d * most + r))) for d, r in enumerate(rows)]
    return insert_call(g, torch.cat, (parts, 0))

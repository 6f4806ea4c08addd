"""Pass 1b — give every linear a role, from dataflow around the attention sites (never from names).

Cases handled:
  * q / k / v: the first linears (walking back) that reach the attention's query, the new
    keys/values written into cpcompile's cache (or the attention's K/V when there is no
    cache). One linear reaching several of them is fused: `qkv` (Phi-3, GPT-NeoX) or `kv`.
    A linear reached from the cache side of the attention (DeepSeek-V3's `kv_b_proj`, applied
    to cached latents) is `kv_up`; linears feeding only attention-side linears (DeepSeek-V3's
    `q_a_proj`) join that attention as `q_down`/`kv_down`.
  * o: the first linear consuming the attention output.
  * FFN, the linears after `o` and before the next layer's attention:
    `gate`, `up` (the one without the activation), `down` when act(a) * b feeds the third;
    `gate_up` + `down` when one linear's output is split and multiplied (Phi-3);
    `fc1` + `fc2` for act in between (GPT-NeoX). Anything else there (MoE routers and
    experts, DeepSeek-V3) is `ffn_other` and stays replicated.
  * lm_head: the last linear, reaching the graph output with no linear after it.
  * expert_up / expert_down (MoE): a grouped matmul (`torch._grouped_mm`, `F.grouped_mm`, or
    transformers' `grouped_mm_fallback`: the "grouped_mm" experts implementation) over a 3-D
    parameter `[E, out, in]` (or `[E, in, out]`) whose rows are grouped by the routing offsets;
    `expert_up` (gate_up or up) is the one whose output reaches the input of another with the same
    offsets, `expert_down`. Their `Projection` has `experts = E` and [out, in] per expert. The
    router (a linear whose scores reach a top-k in a layer with experts) is `router`, replicated
    (E x H, a few KiB); whatever else the MoE block holds keeps the roles above (a sigmoid gate on
    the shared expert: `ffn_other`, replicated; a shared expert's gate/up/down triple, found among the block's linears by the same
    act(gate) * up rule: `shared_gate` / `shared_up` / `shared_down`, placed as the experts are).
  * embedding: every `F.embedding` lookup into a model parameter (the token embedding; a
    learned position table too). Recorded as a `Projection` whose [out, in] is the table's
    [rows, width], so the plan places it like the other weights (vocab-parallel). An embedding
    table or LM head weight that is also read by anything else (beyond the embedding lookups
    and the LM head of a tied pair) is `shared` and stays replicated.

Reads the graph, and tags every linear with the name of its weight (`meta["cpcompile_weight"]`),
which the later passes read. Names come from **tensor identity**: the parameter object behind a
weight's placeholder (the real tensor Dynamo passes the backend for it) looked up in
`param_names(model)` (`input_names`). Dynamo's
source strings are never parsed: they change whenever transformers wraps its forwards
(`args.0.model.layers.0...` under a decorator since 5.24). Without a name table (the plain
backend on a bare function) the placeholder's own name stands in, for display only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from cpcompile.passes._fx import ancestors, descendants, is_op, val
from cpcompile.passes.find_attention import AttentionSite
from cpcompile.passes.normalize_linears import is_batch_view, is_cast, is_transpose


@dataclass
class Projection:
    node: fx.Node
    role: str
    layer: int  # -1: outside the decoder layers (lm_head, embedding)
    weight: str  # parameter name
    bias: str | None = None
    out_features: int = 0
    in_features: int = 0
    transposed: bool = False  # the parameter is stored [in, out] (Conv1D); slices follow it
    experts: int = 0  # expert_up / expert_down: E, the leading dim of the 3-D parameter
    offsets: fx.Node | None = None  # expert_up / expert_down: the grouped matmul's routing offsets


@dataclass
class Roles:
    projections: list[Projection] = field(default_factory=list)

    def by_layer(self, layer: int) -> list[Projection]:
        return [p for p in self.projections if p.layer == layer]


def _is_linear(n: fx.Node) -> bool:
    return is_op(n, "linear")


def _first_linears_back(node: fx.Node) -> set[fx.Node]:
    if _is_linear(node):
        return {node}
    stop = lambda n: _is_linear(n) or is_op(n, "kv_cache_read") or n.op == "placeholder"
    return {n for n in ancestors(node, stop) if _is_linear(n)}


def _first_linears_forward(node: fx.Node, stop=lambda n: False) -> set[fx.Node]:
    return {n for n in descendants([node], lambda n: _is_linear(n) or stop(n)) if _is_linear(n)}


def param_names(model) -> dict[int, str]:
    """Every parameter and buffer of `model`, keyed by tensor identity (tied weights: the first name)."""
    names: dict[int, str] = {}
    for name, t in itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), name)
    return names


def input_names(gm: fx.GraphModule, example_inputs: list, params: dict[int, str]) -> dict[fx.Node, str]:
    """The graph's inputs that are model weights -> their names, by identity: Dynamo hands the backend
    the real tensors as `example_inputs`, one per placeholder, in order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: params[id(t)] for n, t in zip(placeholders, example_inputs) if id(t) in params}


def weight_input(node: fx.Node) -> tuple[fx.Node, bool]:
    """The graph input a linear's weight argument is a view of, and whether it is that input
    transposed (stored [in, out]); dtype casts looked through (DeepSeek-V3's router runs in fp32)."""
    flips = 0
    while node.op in ("call_method", "call_function") and node.all_input_nodes:
        if is_transpose(node):
            flips += 1
        elif not (is_cast(node) or is_batch_view(node)):
            break
        node = node.args[0]
    return node, bool(flips % 2)


def param_name(node: fx.Node, names: dict[fx.Node, str] | None) -> str:
    """The parameter name of a weight node (casts and transposes looked through, `weight_input`),
    from `input_names` (see the module docstring)."""
    node = weight_input(node)[0]
    if node.op == "get_attr":
        return str(node.target)
    if names is not None:
        return names.get(node, f"<not a parameter: {node.name}>")  # parallelize refuses to shard such a weight
    return node.name


def new_kv(site: AttentionSite) -> tuple[list[fx.Node], list[fx.Node]]:
    """The tensors written into the cache for this site's keys and values."""
    if site.cache_read is None:
        return [site.key], [site.value]
    keys_buf, values_buf = site.cache_read.args[:2]
    # buf.index_copy_(dim, dest, source): args = (buf, dim, dest, source)
    writes = lambda buf: [u.args[3] for u in buf.users if u.op == "call_method" and u.target == "index_copy_"]
    return writes(keys_buf), writes(values_buf)


def find_projections(gm: fx.GraphModule, sites: list[AttentionSite], names: dict[fx.Node, str] | None = None) -> Roles:
    linears = [n for n in gm.graph.nodes if _is_linear(n)]
    weights = {n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr") and (names is None or n in names)}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    role: dict[fx.Node, tuple[str, int]] = {}

    groups: list[set[fx.Node]] = []
    for site in sites:
        i = site.index
        new_k, new_v = new_kv(site)
        q = _first_linears_back(site.query)
        k = set().union(*(_first_linears_back(n) for n in new_k))
        v = set().union(*(_first_linears_back(n) for n in new_v))
        up = set()
        if site.cache_read is not None:
            up = (_first_linears_back(site.key) | _first_linears_back(site.value)) - q
        for lin in q | k | v:
            tags = "".join(t for t, s in (("q", q), ("k", k), ("v", v)) if lin in s)
            if up and tags in ("k", "v", "kv"):
                tags = "kv_down"  # writes latents the cache-side up-projection expands (MLA)
            if site.latent is not None and tags == "q":
                tags = "mla_q"  # its query is absorbed over all heads on every rank (absorb_latent.py)
            role[lin] = (tags, i)
        for lin in up:
            role[lin] = ("kv_up", i)
        group = q | k | v | up
        # Linears whose outputs feed only this attention's projections (low-rank q/kv down-projections).
        changed = True
        while changed:
            changed = False
            for lin in linears:
                if lin in role:
                    continue
                fwd = _first_linears_forward(lin)
                if fwd and fwd <= group and not any(_residual_add(u, weights) for u in descendants([lin], _is_linear)):
                    kind = "q_down" if fwd & q else "kv_down"
                    role[lin] = (kind, i)
                    group.add(lin)
                    changed = True
        # o: the first linears on the attention output's way to the layer's residual add (never past
        # it: the next thing there may be another layer's projection or, tied to the embedding, the LM head)
        o = _first_linears_forward(site.output, stop=lambda n: _residual_add(n, weights)) - group
        for lin in o:
            role[lin] = ("o", i)
        groups.append(group | o)

    # FFN windows: unassigned linears after layer i's o and before layer i+1's first projection.
    # (a site with no projection at all is bounded by its own attention; plan refuses to shard it)
    starts = [min((order[n] for n in g), default=order[s.output]) for g, s in zip(groups, sites)] + [len(order)]
    ends = [max((order[n] for n in g), default=order[s.output]) for g, s in zip(groups, sites)]
    lm_head = _lm_head(gm, linears, role)
    if lm_head is not None:
        role[lm_head] = ("lm_head", -1)
    for i in range(len(sites)):
        window = [n for n in linears if n not in role and ends[i] < order[n] < starts[i + 1]]
        for lin, r in _ffn_roles(window).items():
            role[lin] = (r, i)
    experts = _experts(gm, weights, names, lambda n: next((i for i in range(len(sites)) if ends[i] < order[n] < starts[i + 1]), -1))
    moe_layers = {p.layer for p in experts}
    for lin in linears:  # a MoE block's router: its scores choose the experts (top-k)
        r, layer = role.get(lin, (None, -1))
        if r == "ffn_other" and layer in moe_layers and any(is_topk(n) for n in descendants([lin], _is_linear)):
            role[lin] = ("router", layer)
    for lin in linears:
        role.setdefault(lin, ("other", -1))
    # A weight used in more than one place (an LM head tied to the embedding, a projection shared by
    # layers) is never given a layer role: sharding it for one use would break the others.
    for lin in linears:
        if role[lin][0] not in ("lm_head", "other") and _weight_uses(lin.args[1]) > 1:
            role[lin] = ("shared", -1)

    projections = _embeddings(gm, weights, names)
    for lin in linears:
        r, layer = role[lin]
        w = lin.args[1]
        b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        wv = w.meta.get("example_value", w.meta.get("val")) if isinstance(w, fx.Node) else None
        out_f, in_f = (tuple(wv.shape) + (0, 0))[:2] if wv is not None else (0, 0)  # linear's [out, in]
        weight = param_name(w, names) if isinstance(w, fx.Node) else str(w)
        transposed = weight_input(w)[1] if isinstance(w, fx.Node) else False
        lin.meta["cpcompile_weight"] = weight  # what shard_linears / split_tokens read
        bias = param_name(b, names) if isinstance(b, fx.Node) else None
        projections.append(Projection(lin, r, layer, weight, bias, int(out_f), int(in_f), transposed))
    _check_vocab_uses(projections)
    return Roles(projections + experts)


def _grouped_mm_ops() -> tuple:
    ops = [getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)]
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        ops += [fallback, fallback.default]
    return tuple(o for o in ops if o is not None)


def is_grouped_mm(n: fx.Node) -> bool:
    """`grouped_mm(x [S, in], W [E, in, out], offs=...)`: row group g of x times W[g]."""
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in _grouped_mm_ops()


def grouped_mm_args(n: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(x, W, offs) of a grouped matmul."""
    offs = n.kwargs.get("offs", n.args[2] if len(n.args) > 2 else None)
    return n.args[0], n.args[1], offs


def _expert_weight(w: fx.Node) -> tuple[fx.Node, bool]:
    """The 3-D graph input behind a grouped matmul's weight argument [E, in, out], and whether it
    is stored transposed from that, i.e. [E, out, in] (HF's gate_up_proj / down_proj)."""
    flips = 0
    while w.op in ("call_method", "call_function") and w.all_input_nodes:
        if (w.op == "call_method" and w.target == "transpose" or w.target is torch.transpose) and \
                {d % 3 for d in w.args[1:3]} == {1, 2}:
            flips += 1
        elif not is_cast(w):
            break
        w = w.args[0]
    return w, bool(flips % 2)


def _experts(gm: fx.GraphModule, weights: set[fx.Node], names, layer_of) -> list[Projection]:
    """expert_up / expert_down pairs of grouped matmuls over 3-D parameters (see the module docstring)."""
    grouped = [n for n in gm.graph.nodes if is_grouped_mm(n)]
    out = []
    for up in grouped:
        _, w_up, offs = grouped_mm_args(up)
        src_up, _ = _expert_weight(w_up)
        downs = [d for d in descendants([up], lambda n: is_grouped_mm(n) and n is not up) if is_grouped_mm(d) and d is not up]
        if src_up not in weights or len(downs) != 1 or grouped_mm_args(downs[0])[2] is not offs:
            continue
        down = downs[0]
        src_down, _ = _expert_weight(grouped_mm_args(down)[1])
        if src_down not in weights or layer_of(up) < 0:
            continue
        for node, role in ((up, "expert_up"), (down, "expert_down")):
            w = grouped_mm_args(node)[1]
            src, stored_out_in = _expert_weight(w)
            e, i, o = (int(d) for d in val(w).shape)  # the matmul's [E, in, out]
            node.meta["cpcompile_weight"] = weight = param_name(src, names)
            out.append(Projection(node, role, layer_of(up), weight, None, o, i, not stored_out_in, e, offs))
    return out


def is_topk(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is torch.topk or n.op == "call_method" and n.target == "topk"


def is_embedding(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (F.embedding, torch.embedding)


def embedding_args(n: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(indices, table) of an embedding lookup (`torch.embedding` takes the table first)."""
    if n.target is torch.embedding:
        return n.args[1], n.args[0]
    return n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs["weight"]


def _embeddings(gm: fx.GraphModule, weights: set[fx.Node], names) -> list[Projection]:
    out = []
    for n in gm.graph.nodes:
        if not is_embedding(n):
            continue
        table = embedding_args(n)[1]
        if not isinstance(table, fx.Node) or weight_input(table)[0] not in weights or weight_input(table)[1]:
            continue  # a computed table: nothing to shard
        rows, width = (tuple(table.meta.get("example_value", table.meta.get("val")).shape) + (0, 0))[:2]
        weight = param_name(table, names)
        n.meta["cpcompile_weight"] = weight
        out.append(Projection(n, "embedding", -1, weight, None, int(rows), int(width)))
    return out


def _check_vocab_uses(projections: list[Projection]) -> None:
    """An embedding table / LM head weight is vocab-parallel only if every read of it is one of these
    lookups or the LM head (a tied pair shares one shard); anything else makes it `shared`."""
    vocab = [p for p in projections if p.role in ("embedding", "lm_head")]
    for p in vocab:
        src = weight_input(p.node.args[1] if p.role == "lm_head" else embedding_args(p.node)[1])[0]
        known = sum(1 for q in vocab if q.weight == p.weight)
        if _weight_uses(src) != known:
            p.role = "shared"


def _weight_uses(w: fx.Node) -> int:
    """How many computations read the graph input behind the weight argument `w` (its views and casts
    looked through)."""
    src = weight_input(w)[0]
    uses, todo = 0, [src]
    while todo:
        for u in todo.pop().users:
            if is_transpose(u) or is_cast(u) or is_batch_view(u):
                todo.append(u)
            else:
                uses += 1
    return uses


def _residual_add(n: fx.Node, weights: set[fx.Node] = frozenset()) -> bool:
    """An add of two computed tensors (a residual connection), as opposed to `x + const` or `x + bias`."""
    if not is_op(n, "add") or not all(isinstance(a, fx.Node) for a in n.args[:2]):
        return False
    return not any(weight_input(a)[0] in weights for a in n.args[:2])


def _lm_head(gm: fx.GraphModule, linears: list[fx.Node], role: dict) -> fx.Node | None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for lin in reversed(linears):
        if lin in role:
            continue
        if not _first_linears_forward(lin) and out in descendants([lin], lambda n: False):
            return lin
        return None
    return None


def _feeds_product_directly(lin: fx.Node) -> bool:
    """True if `lin`'s output goes straight (dtype casts aside) into a product: the `up` of act(gate) * up."""
    n = lin
    while len(n.users) == 1 and (is_op(next(iter(n.users)), "to") or is_op(next(iter(n.users)), "reshape")):
        n = next(iter(n.users))  # casts, and the view back to [B, T, I] of a Conv1D-style projection
    return len(n.users) == 1 and is_op(next(iter(n.users)), "mul")


def _unviewed(x):
    """`x` before reshapes/views (a Conv1D-style projection flattens its input to rows itself)."""
    while is_op(x, "reshape"):
        x = x.args[0]
    return x


def _ffn_roles(window: list[fx.Node]) -> dict[fx.Node, str]:
    if len(window) == 3:
        a, b, c = window
        if _unviewed(a.args[0]) is _unviewed(b.args[0]) and _first_linears_forward(a) == {c} == _first_linears_forward(b):
            # act(gate) * up: `up` feeds the product directly, `gate` through its activation
            if _feeds_product_directly(a) != _feeds_product_directly(b):
                gate, up = (b, a) if _feeds_product_directly(a) else (a, b)
                return {gate: "gate", up: "up", c: "down"}
    if len(window) == 2:
        a, c = window
        if _first_linears_forward(a) == {c}:
            path = descendants([a], lambda n: n is c)
            split = any(is_op(n, "getitem") or (n.op == "call_method" and n.target in ("chunk", "split")) for n in path)
            product = any(is_op(n, "mul") and all(isinstance(x, fx.Node) for x in n.args[:2]) for n in path)
            if split and product:
                return {a: "gate_up", c: "down"}
            return {a: "fc1", c: "fc2"}
    out = {lin: "ffn_other" for lin in window}
    if len(window) > 3:  # a MoE block: a dense gate/up/down triple beside the router (a shared expert)
        for c in window:
            feeding = [x for x in window if x is not c and _first_linears_forward(x) == {c}]
            if len(feeding) == 2 and _unviewed(feeding[0].args[0]) is _unviewed(feeding[1].args[0]):
                a, b = feeding
                if _feeds_product_directly(a) != _feeds_product_directly(b):
                    gate, up = (b, a) if _feeds_product_directly(a) else (a, b)
                    out.update({gate: "shared_gate", up: "shared_up", c: "shared_down"})
    return out

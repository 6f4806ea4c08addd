"""Pass 3 — rewrite every attention site into `cpcompile::attention_with_lse` over this rank's slots.

Cases handled:
  * K/V from cpcompile's cache: the `kv_cache_read` marker is replaced by the local slot views
    `keys[:, :, :S_local]` / `values[:, :, :S_local]` (the sink slot dropped); slot-wise ops
    between the read and the attention (DeepSeek-V3's latent up-projection) are kept.
    Query positions are the cache's `pos_new`, slot positions its `slot_pos`.
  * K/V computed in the graph (no cache, or a cache that is not cpcompile's at cp = 1):
    key index = position, queries are the last Lq positions (lower-right aligned, as HF's
    masks and SDPA's `is_causal` with Lq == S agree).
  * HF's mask `[B|1, 1, Lq, S]` (bool or additive float) is passed on as `[B, Lq, S]`; causality
    and empty slots are enforced by the kernel from positions in every case.

Invariants: the graph stays functional apart from the cache writes Dynamo already recorded;
every inserted node carries `meta["val"]`; no SDPA, eager-softmax attention or
`kv_cache_read` node remains (the pass raises if one would).

Before (Llama layer, cp = 1):
    keys, values = cpcompile.kv_cache_read(l_keys, l_values, l_slot_pos, pos_new, 32)
    key = keys[:, :, None].expand(2, 2, 2, 32, 16).reshape(2, 4, 32, 16)
    o = torch._C._nn.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=0.25)
After:
    k = l_keys[:, :, :32]; v = l_values[:, :, :32]
    pos_q = pos_new.unsqueeze(0).expand(2, 5); pos_kv = l_slot_pos[:32].unsqueeze(0).expand(2, 32)
    filled = (pos_new[-1:] + 1).expand(2)   # slots written so far: the kernel reads only these
    o, lse = cpcompile.attention_with_lse(q, k, v, pos_q, pos_kv, 0.25, 0.0, 0, mask[:, 0], filled)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from typing import TYPE_CHECKING

from cpcompile.kernels.layout import kv_head_range
from cpcompile.passes._fx import getitem_user, insert_call, is_op, shape, source_line, val
from cpcompile.passes.absorb_latent import expands, latent_inputs, local_latent, up_project, written_region
from cpcompile.passes.find_attention import AttentionError, AttentionSite
from cpcompile.passes.local_layouts import mark_local

if TYPE_CHECKING:
    from cpcompile.distributed import RankContext

_ALL = slice(None)


@dataclass
class RewriteResult:
    rewritten: int  # attention sites replaced
    cache_reads_removed: int
    latent_absorbed: int = 0  # MLA sites attending the cached latent (absorb_latent.py)
    latent_expanded: int = 0  # MLA sites expanded to per-head K/V (a prefill chunk where that costs fewer FLOPs)


def rewrite_attention(gm: fx.GraphModule, sites: list[AttentionSite], ctx: "RankContext | None" = None) -> RewriteResult:
    """`ctx`: this rank under tp x cp (DESIGN.md section 2); None on one device."""
    g = gm.graph
    reads_done: dict[fx.Node, int] = {}  # kv_cache_read -> S_local
    latent = {True: 0, False: 0}  # expanded -> MLA sites
    for site in sites:
        d = site.dims
        lat = site.latent
        n_slots, slot_rank = _slot_split(site, ctx)
        expansion = written_region([site.key, site.value], set(site.cache_read.users)) if lat is not None else set()
        with g.inserting_before(site.output):
            q = site.query
            if site.cache_read is not None:
                s_local = reads_done.get(site.cache_read) or _replace_cache_read(g, site)
                reads_done[site.cache_read] = s_local
                keys_buf, _, slot_pos, pos_new, max_length = site.cache_read.args[:5]
                if lat is not None:  # MLA: attend over the cached latent (absorb_latent.py)
                    expanded = expands(lat, d["Lq"], s_local)
                    latent[expanded] += 1
                    q, k, v = latent_inputs(g, site, lat, local_latent(g, site.cache_read, s_local), expanded)
                else:
                    k, v = site.key, site.value
                    if shape(k)[2] != s_local:
                        raise AttentionError(f"attention #{site.index}: reads {shape(k)[2]} slots, expected {s_local}")
                pos_q = _expand_rows(g, pos_new, d["B"])
                pos_kv = _expand_rows(g, insert_call(g, operator.getitem, (slot_pos, slice(None, s_local))), d["B"])
                filled = _filled_slots(g, pos_new, d["B"], n_slots, slot_rank, ctx.kv_interleave if ctx else 1)
            else:
                if ctx is not None and ctx.cp > 1:
                    raise AttentionError(
                        f"attention #{site.index}: its K/V do not come from cpcompile's KVCache, so they cannot be "
                        "sharded over the sequence (cp > 1). Run through cpcompile.parallelize, which installs the cache."
                    )
                k, v = site.key, site.value
                if ctx is not None and ctx.tp > 1:
                    kv0, kv1 = kv_head_range(d["Hkv"], ctx.tp, ctx.tp_rank)
                    k = insert_call(g, operator.getitem, (k, (_ALL, slice(kv0, kv1))))
                    v = insert_call(g, operator.getitem, (v, (_ALL, slice(kv0, kv1))))
                s, lq = d["S"], d["Lq"]
                device = val(site.query).device
                pos_kv = _expand_rows(g, insert_call(g, torch.arange, (s,), {"device": device}), d["B"])
                pos_q = _expand_rows(g, insert_call(g, torch.arange, (s - lq, s), {"device": device}), d["B"])
                filled = None
            mask = _kernel_mask(g, site.mask, d) if site.mask is not None else None
            heads = {"tp": (0, d["Hq"]), "out": (0, d["Hq"])}
            if ctx is not None:
                from cpcompile.passes.shard_weights import head_ranges

                heads = head_ranges(ctx, d["Hq"])
                if ctx.tp > 1 and lat is None:  # a latent site attends every head over its slots (Helix)
                    q = insert_call(g, operator.getitem, (q, (_ALL, slice(*heads["tp"]))))
                if mask is not None and n_slots > 1 and site.cache_read is not None:
                    mask = _mask_to_slots(gm, mask, shape(k)[2], n_slots, slot_rank, ctx.kv_interleave)
            out = insert_call(
                g,
                torch.ops.cpcompile.attention_with_lse.default,
                (q, k, v, pos_q, pos_kv, site.scale, site.softcap, 0, mask, filled),
            )
            o = insert_call(g, operator.getitem, (out, 0))
            uv_before = lat is not None and not expanded and ctx is not None and ctx.mla_uv == "before"
            if uv_before:  # every head through W_UV here: the exchange below carries Dv, not R, per head
                o = up_project(g, lat, o, (0, d["Hq"]))
            if ctx is not None:
                lse = insert_call(g, operator.getitem, (out, 1))
                o = _combine(g, o, lse, ctx.combine, n_slots, ctx.group_names["replica" if lat is not None else "cp"])
                if lat is not None and shape(o)[1] == d["Hq"] and heads["out"] != (0, d["Hq"]):
                    o = insert_call(g, operator.getitem, (o, (_ALL, slice(*heads["out"]))))  # all_gather: every head merged
            if lat is not None and not expanded and not uv_before:
                o = up_project(g, lat, o, heads["out"])  # W_UV for the heads this rank holds, after the exchange
            if ctx is not None:
                h0, h1 = heads["out"]
                local = o
                o = insert_call(g, F.pad, (o, (0, 0, 0, 0, h0, d["Hq"] - h1)))  # all heads, kept local by local_layouts
                group = "tp" if ctx.combine == "all_gather" or ctx.cp == 1 else "replica"
                mark_local(o, local, 1, range(h0, h1), d["Hq"], group, ctx.group_names[group],
                           ctx.tp * (ctx.cp if group == "replica" else 1))
        old = site.output
        old.replace_all_uses_with(o)
        _erase_dead([old, *site.chain])
        _erase_written(g, expansion)
    for read in reads_done:
        _erase_dead([u for u in read.users] + [read])
    leftover = [n for n in g.nodes if is_op(n, "sdpa") or is_op(n, "kv_cache_read")]
    if leftover:
        raise AttentionError(
            f"attention rewrite left {len(leftover)} attention/cache-read node(s) that no recognised attention "
            "consumes; cpcompile replaces attention only where the cached keys/values feed nothing but it:\n"
            + "\n".join(f"  - {_describe_leftover(n)}" for n in leftover)
            + "\nAn extra term in the scores or softmax (attention sinks, a learned bias, a custom normalisation) is "
            "not supported in this version; `cpcompile.explain(model)` lists the attention sites it did recognise."
        )
    g.lint()
    gm.recompile()
    return RewriteResult(len(sites), len(reads_done), latent[False], latent[True])


def _slot_split(site: AttentionSite, ctx: "RankContext | None") -> tuple[int, int]:
    """(ranks the site's KV slots are split over, this rank's index among them): the CP group, or
    for a latent (MLA) site, whose one KV head cannot be split by heads, the whole replica (Helix)."""
    if ctx is None:
        return 1, 0
    if site.latent is not None:
        return ctx.tp * ctx.cp, ctx.tp_rank * ctx.cp + ctx.cp_rank
    return ctx.cp, ctx.cp_rank


def _erase_written(g: fx.Graph, region: set[fx.Node]) -> None:
    """Erase what is left of an MLA site's expansion, in-place writes into its dead temporaries
    included (`_erase_dead` keeps in-place calls, rightly, everywhere else)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    erased: set[fx.Node] = set()
    for n in sorted((n for n in region if n in order), key=order.get, reverse=True):
        if all(u in erased for u in n.users) and n.op in ("call_function", "call_method"):
            g.erase_node(n)
            erased.add(n)


def _describe_leftover(n: fx.Node) -> str:
    if is_op(n, "sdpa"):
        return f"{n.name}: a scaled_dot_product_attention call not matched as an attention site ({source_line(n)})"
    consumers, seen, todo = [], set(), list(n.users)
    while todo and len(consumers) < 3:  # through getitem and views, to the ops that compute with K/V
        u = todo.pop(0)
        if u in seen:
            continue
        seen.add(u)
        name = getattr(u.target, "__name__", str(u.target))
        if u.target is operator.getitem or name in _VIEWS:
            todo += list(u.users)
        else:
            consumers.append(f"{name} at {source_line(u)}")
    return f"{n.name} (cached keys/values) still used by: {'; '.join(consumers) or 'nothing'}"


_VIEWS = {"view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "contiguous", "to", "float",
          "repeat_interleave", "flatten", "clone", "type_as", "narrow", "getitem"}


def _replace_cache_read(g: fx.Graph, site: AttentionSite) -> int:
    """Point the read's users at this rank's slot views; returns S_local (sink slot excluded)."""
    read = site.cache_read
    keys_buf, values_buf, _, _, max_length = read.args[:5]
    s_local = shape(keys_buf)[2] - 1
    if site.latent is not None:
        return s_local  # absorb_latent builds its K/V from the buffer; the read's outputs die with the expansion
    if s_local != max_length and (site.key.args[0] is not read or site.value.args[0] is not read):
        # Ops between the read and the attention were traced with the global length baked into
        # their shapes; at cp > 1 they would need re-shaping (planned with the CP issue).
        raise AttentionError(
            f"attention #{site.index}: slot-wise ops between the cache and the attention with "
            f"{s_local} local slots != {max_length} global; not supported yet"
        )
    with g.inserting_after(read):
        k_loc = insert_call(g, operator.getitem, (keys_buf, (_ALL, _ALL, slice(None, s_local))))
    with g.inserting_after(k_loc):
        v_loc = insert_call(g, operator.getitem, (values_buf, (_ALL, _ALL, slice(None, s_local))))
    for i, new in ((0, k_loc), (1, v_loc)):
        item = getitem_user(read, i)
        if item is not None:
            item.replace_all_uses_with(new)
            if site.key is item:
                site.key = new
            if site.value is item:
                site.value = new
    return s_local


def _expand_rows(g: fx.Graph, pos: fx.Node, batch: int) -> fx.Node:
    """[N] -> [B, N] (a stride-0 view: one position row shared by the batch)."""
    row = insert_call(g, torch.Tensor.unsqueeze, (pos, 0))
    return insert_call(g, torch.Tensor.expand, (row, batch, shape(pos)[0]))


def _filled_slots(g: fx.Graph, pos_new: fx.Node, batch: int, cp: int, r: int, i: int) -> fx.Node:
    """[B] int64: this rank's filled local slots once this step's tokens are written, so the kernel
    reads the live prefix only (decode cost follows the context, not max_length). The slots fill
    in order: positions 0..n-1 are written, and this CP rank holds those of them that the
    interleave rule gives it, a prefix of its slots (`kernels.layout`). `cp`: the ranks the slots are
    split over (`_slot_split`), `r` this rank's index, `i` the interleave."""
    n = insert_call(g, operator.add, (insert_call(g, operator.getitem, (pos_new, slice(-1, None))), 1))  # [1]
    if cp > 1:
        full = insert_call(g, operator.floordiv, (n, cp * i))
        rest = insert_call(g, operator.sub, (n, insert_call(g, operator.mul, (full, cp * i))))
        mine = insert_call(g, torch.clamp, (insert_call(g, operator.sub, (rest, r * i)),), {"min": 0, "max": i})
        n = insert_call(g, operator.add, (insert_call(g, operator.mul, (full, i)), mine))
    return insert_call(g, torch.Tensor.expand, (n, batch))


def _kernel_mask(g: fx.Graph, mask: fx.Node, d: dict[str, int]) -> fx.Node:
    """HF's [B|1, 1, Lq, S] mask -> the kernel's [B, Lq, S]."""
    m = insert_call(g, operator.getitem, (mask, (_ALL, 0)))
    if shape(m)[0] != d["B"] or shape(m)[1] != d["Lq"]:
        m = insert_call(g, torch.Tensor.expand, (m, d["B"], d["Lq"], shape(m)[2]))
    return m


def _erase_dead(roots: list[fx.Node]) -> None:
    """Erase `roots` and, transitively, inputs left without users — only pure nodes we replaced.

    (FX's eliminate_dead_code would also drop the cache's in-place `index_copy_` method calls,
    which it considers pure.)
    """
    todo = list(roots)
    while todo:
        n = todo.pop()
        if getattr(n, "_erased", False) or n.users or n.op not in ("call_function", "call_method"):
            continue
        if n.op == "call_method" and n.target.endswith("_") or n.op == "call_function" and n.is_impure():
            continue  # in-place or side-effecting
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        todo.extend(inputs)


_c10d = torch.ops._c10d_functional


def _mask_to_slots(gm: fx.GraphModule, mask: fx.Node, s_local: int, cp: int, r: int, interleave: int) -> fx.Node:
    """[B, Lq, max_length] over global positions -> [B, Lq, S_local] over this rank's slots."""
    from cpcompile.kernels.layout import slot_positions
    from cpcompile.passes.shard_linears import graph_constant

    g = gm.graph
    n_cols = shape(mask)[-1]
    idx = slot_positions(s_local, cp, r, interleave).clamp(max=n_cols - 1)
    idx_node = graph_constant(gm, idx.to(val(mask).device), "_cpcompile_slots")
    return insert_call(g, torch.Tensor.index_select, (mask, -1, idx_node))


def _pack(g: fx.Graph, o: fx.Node, lse: fx.Node) -> fx.Node:
    """(o [.., Dv], lse [..] fp32) -> one tensor [.., Dv + e] in o's dtype, lse bit-cast (exact)."""
    l = insert_call(g, torch.Tensor.unsqueeze, (lse, -1))
    if val(o).dtype != torch.float32:
        l = insert_call(g, torch.Tensor.view, (l, val(o).dtype))
    return insert_call(g, torch.cat, ([o, l], -1))


def _unpack(g: fx.Graph, x: fx.Node, dv: int) -> tuple[fx.Node, fx.Node]:
    o = insert_call(g, operator.getitem, (x, (Ellipsis, slice(None, dv))))
    l = insert_call(g, torch.Tensor.contiguous, (insert_call(g, operator.getitem, (x, (Ellipsis, slice(dv, None)))),))
    if val(x).dtype != torch.float32:
        l = insert_call(g, torch.Tensor.view, (l, torch.float32))
    return o, insert_call(g, operator.getitem, (l, (Ellipsis, 0)))


def _combine(g: fx.Graph, o: fx.Node, lse: fx.Node, combine: str, cp: int, name: str) -> fx.Node:
    """Exact combine of partial (o, lse) over the `cp` ranks of group `name` that hold this site's KV
    slots (DESIGN.md section 2; the replica for a latent site)."""
    if cp == 1:
        return o
    b, h, lq, dv = shape(o)
    merge = torch.ops.cpcompile.merge_states.default
    if combine == "all_gather":
        packed = _pack(g, o, lse)
        got = insert_call(g, _c10d.all_gather_into_tensor.default, (packed, cp, name))
        got = insert_call(g, _c10d.wait_tensor.default, (got,))
        got = insert_call(g, torch.Tensor.view, (got, (cp, b, h, lq, shape(packed)[-1])))
        o_r, lse_r = _unpack(g, got, dv)
        return insert_call(g, operator.getitem, (insert_call(g, merge, (o_r, lse_r)), 0))
    hc = h // cp
    if combine == "all_to_all":  # Helix: peer j gets its 1/cp of the heads, o and lse in one exchange
        packed = _pack(g, o, lse)
        e = shape(packed)[-1]
        x = insert_call(g, torch.Tensor.view, (packed, (b, cp, hc, lq, e)))
        x = insert_call(g, torch.Tensor.contiguous, (insert_call(g, torch.Tensor.transpose, (x, 0, 1)),))
        got = insert_call(g, _c10d.all_to_all_single.default, (x, [1] * cp, [1] * cp, name))
        got = insert_call(g, _c10d.wait_tensor.default, (got,))
        o_r, lse_r = _unpack(g, got, dv)  # [cp, B, Hc, Lq, Dv], [cp, B, Hc, Lq]
        return insert_call(g, operator.getitem, (insert_call(g, merge, (o_r, lse_r)), 0))
    # ag_rs (vLLM DCP): all-gather lse, rescale the local o, reduce-scatter over heads
    all_lse = insert_call(g, _c10d.all_gather_into_tensor.default, (lse, cp, name))
    all_lse = insert_call(g, _c10d.wait_tensor.default, (all_lse,))
    all_lse = insert_call(g, torch.Tensor.view, (all_lse, (cp, b, h, lq)))
    total = insert_call(g, torch.logsumexp, (all_lse, 0))
    w = insert_call(g, torch.exp, (insert_call(g, operator.sub, (lse, total)),))
    w = insert_call(g, torch.nan_to_num, (w,), {"nan": 0.0})  # -inf - -inf: no visible slot anywhere
    scaled = insert_call(g, operator.mul, (insert_call(g, torch.Tensor.float, (o,)), insert_call(g, torch.Tensor.unsqueeze, (w, -1))))
    x = insert_call(g, torch.Tensor.view, (scaled, (b, cp, hc, lq, dv)))
    x = insert_call(g, torch.Tensor.contiguous, (insert_call(g, torch.Tensor.transpose, (x, 0, 1)),))
    got = insert_call(g, _c10d.reduce_scatter_tensor.default, (x, "sum", cp, name))
    got = insert_call(g, _c10d.wait_tensor.default, (got,))
    got = insert_call(g, torch.Tensor.view, (got, (b, hc, lq, dv)))
    return insert_call(g, torch.Tensor.to, (got, val(o).dtype))

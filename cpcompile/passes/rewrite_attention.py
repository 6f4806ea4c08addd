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
    o, lse = cpcompile.attention_with_lse(q, k, v, pos_q, pos_kv, 0.25, 0.0, 0, mask[:, 0])
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from cpcompile.passes._fx import getitem_user, insert_call, is_op, shape, val
from cpcompile.passes.find_attention import AttentionError, AttentionSite

_ALL = slice(None)


@dataclass
class RewriteResult:
    rewritten: int  # attention sites replaced
    cache_reads_removed: int


def rewrite_attention(gm: fx.GraphModule, sites: list[AttentionSite]) -> RewriteResult:
    g = gm.graph
    reads_done: dict[fx.Node, int] = {}  # kv_cache_read -> S_local
    for site in sites:
        d = site.dims
        with g.inserting_before(site.output):
            if site.cache_read is not None:
                s_local = reads_done.get(site.cache_read) or _replace_cache_read(g, site)
                reads_done[site.cache_read] = s_local
                keys_buf, _, slot_pos, pos_new, max_length = site.cache_read.args
                k, v = site.key, site.value
                if shape(k)[2] != s_local:
                    raise AttentionError(f"attention #{site.index}: reads {shape(k)[2]} slots, expected {s_local}")
                pos_q = _expand_rows(g, pos_new, d["B"])
                pos_kv = _expand_rows(g, insert_call(g, operator.getitem, (slot_pos, slice(None, s_local))), d["B"])
            else:
                k, v = site.key, site.value
                s, lq = d["S"], d["Lq"]
                device = val(site.query).device
                pos_kv = _expand_rows(g, insert_call(g, torch.arange, (s,), {"device": device}), d["B"])
                pos_q = _expand_rows(g, insert_call(g, torch.arange, (s - lq, s), {"device": device}), d["B"])
            mask = _kernel_mask(g, site.mask, d) if site.mask is not None else None
            out = insert_call(
                g,
                torch.ops.cpcompile.attention_with_lse.default,
                (site.query, k, v, pos_q, pos_kv, site.scale, site.softcap, 0, mask),
            )
            o = insert_call(g, operator.getitem, (out, 0))
        old = site.output
        old.replace_all_uses_with(o)
        _erase_dead([old, *site.chain])
    for read in reads_done:
        _erase_dead([u for u in read.users] + [read])
    leftover = [n for n in g.nodes if is_op(n, "sdpa") or is_op(n, "kv_cache_read")]
    if leftover:
        raise AttentionError(f"attention rewrite left {len(leftover)} attention/cache-read node(s): {[n.name for n in leftover]}")
    g.lint()
    gm.recompile()
    return RewriteResult(len(sites), len(reads_done))


def _replace_cache_read(g: fx.Graph, site: AttentionSite) -> int:
    """Point the read's users at this rank's slot views; returns S_local (sink slot excluded)."""
    read = site.cache_read
    keys_buf, values_buf, _, _, max_length = read.args
    s_local = shape(keys_buf)[2] - 1
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

"""Pass 3a — absorb MLA's up-projection: attention over the cached latent, not over expanded K/V.

MLA (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-Lite, Youtu, Mistral 4, ...) caches one latent head per
token, `c = kv_nope [B, 1, S, R]` and the RoPE'd key `r = k_rot [B, 1, S, Dr]`, and HF's
`expand_kv` rebuilds per-head K and V from the whole cache at every step:
`y = kv_b_proj(c)`, per head `k_nope = y[h*P + a : + Dn]`, `v = y[h*P + b : + Dv]`, `K = [k_nope, r]`.
Since `K_h = [W_UK[h] c, r]` and `V_h = W_UV[h] c` are linear in the cached values, the scores and
the output can be computed on the latent (vLLM's MLA backends, FlashMLA, TensorRT-LLM):

    q_lat[h] = [q_nope[h] @ W_UK[h], q_rope[h]]        # [B, H, Lq, R + Dr]
    o_lat, lse = attention_with_lse(q_lat, kv, kv[..., :R])   # MQA over the joint latent buffer
    o[h] = o_lat[h] @ W_UV[h]^T                         # after the CP combine, this rank's heads only

The cache holds `kv = [c | r]` in one buffer (`cache.py`, latent layers), so the key is read in place.

Cases handled (found by probing, `find_latent`, so no attribute or parameter name is read):
  * K and V made from the cache read by one bias-free linear `y = up(c)` applied to the latent,
    then pure data movement (views, transposes, split, expand, cat or `new_empty` + slice `copy_`):
    every K column is one feature of `y` or of `r`, every V column one feature of `y`, with
    head h's features at `h*P + const` (the weight then views as `[H, P, R]`, no copy).
Refused (`AttentionError`, naming the layer): a bias on the up-projection, K/V that mix features
(arithmetic between the read and the attention), a V reading the rope key, GQA over the expansion.

Prefill may keep the expanded ("compute-friendly") form: `expands(...)` compares the FLOPs of both
per graph (static Lq and local slots) and takes the cheaper; decode is always absorbed at real dims.

Before (one DeepSeek-V3 layer, as Dynamo records it; tiny dims H=4, R=16, Dr=8, Dn=16, Dv=12):
    keys, values = cpcompile.kv_cache_read(l_keys, l_values, slot_pos, pos_new, 32, 1)
    linear_3 = torch._C._nn.linear(keys, kv_b_proj_weight, None)          # [1, 1, 32, 112]
    kv = linear_3.view((1, 32, -1, 28)).transpose(1, 2); k_nope, v = split(kv, [16, 12], -1)
    key = kv.new_empty(1, 4, 32, 24); key[..., :16].copy_(k_nope); key[..., 16:].copy_(values.expand(-1, 4, -1, -1))
    o = scaled_dot_product_attention(query, key, v, attn_mask=mask, scale=0.204)
After (rewrite_attention with this pass's helpers; cp = 1):
    kv = l_keys[:, :, :32]                                                # [1, 1, 32, 24]: [c | r]
    w = kv_b_proj_weight.view(4, 28, 16)
    q_lat = cat([query[..., :16] @ w[:, 0:16], query[..., 16:24]], -1)     # [1, 4, 1, 24]
    o_lat, lse = cpcompile.attention_with_lse(q_lat, kv, kv[..., :16], pos_q, pos_kv, 0.204, ...)
    o = o_lat @ w[0:4, 16:28].transpose(-1, -2)                           # [1, 4, 1, 12]
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
from torch import fx

from cpcompile.passes._fx import ancestors, getitem_user, insert_call, is_op, shape, val
from cpcompile.passes._probe import evaluate
from cpcompile.passes.find_attention import AttentionError, AttentionSite

_ALL = slice(None)


@dataclass
class LatentKV:
    """How a site's per-head K/V are made from its one cached latent head (`find_latent`)."""

    up: fx.Node  # the up-projection linear applied to the cached latent (kv_b_proj)
    heads: int  # H: K/V heads made (= query heads)
    per_head: int  # P: up-projection output features per head; its weight views as [H, P, R]
    k_cols: tuple[int, int]  # head h's k_nope = features h*P + [a, a + Dn)
    v_cols: tuple[int, int]  # head h's v = features h*P + [b, b + Dv)
    q_nope: tuple[int, ...]  # the query columns that meet k_nope, in k_nope's order
    q_rope: tuple[int, ...]  # the query columns that meet the cached rope key, in its order
    rank: int  # R: the cached latent's width (kv_lora_rank)
    rope: int  # Dr: the cached rope key's width

    @property
    def weight(self) -> fx.Node:
        return self.up.args[1]

    @property
    def dn(self) -> int:
        return self.k_cols[1] - self.k_cols[0]

    @property
    def dv(self) -> int:
        return self.v_cols[1] - self.v_cols[0]

    def describe(self) -> str:
        return (f"MLA latent: R={self.rank} + rope {self.rope} cached per token (1 head), absorbed: "
                f"q_nope {self.dn} -> R through W_UK, o R -> {self.dv} through W_UV, H={self.heads}")


# The probe evaluates the expansion at the graph's own B x S slots in float64, as big as HF's own
# expand_kv at that size: a few MiB on parallelize's capture (1 row, 64 slots), far too much on a
# serving graph of a real model (16 rows x 32k slots x 32k features). Later graphs reuse the
# structure read on the first (`known`); a first graph past this size is refused.
PROBE_BYTES = 1 << 30


def find_latent(site: AttentionSite, known: LatentKV | None = None) -> LatentKV | None:
    """The latent structure of `site`'s K/V, or None when they are read from the cache as they are.
    `known`: the structure read on an earlier graph of the same model (parallelize's capture):
    checked against this graph's shapes and reused instead of probing again."""
    read = site.cache_read
    if read is None:
        return None
    c, r = getitem_user(read, 0), getitem_user(read, 1)
    if site.key in (c, r) and site.value in (c, r):
        return None
    where = f"attention #{site.index}"
    region = written_region([site.key, site.value], stop={n for n in (c, r) if n is not None})
    ups = [n for n in region if is_op(n, "linear") and _latent_input(n.args[0]) is c and c is not None]
    if len(ups) != 1 or r is None:
        return None  # K/V computed from the cache some other way: rewrite_attention refuses it at cp > 1
    up = ups[0]
    if len(up.args) > 2 and up.args[2] is not None or up.kwargs.get("bias") is not None:
        raise AttentionError(f"{where}: the latent up-projection {up.name} adds a bias; cpcompile absorbs bias-free ones only")
    region = written_region([site.key, site.value], stop={up, r})
    if c in region or read in region:
        raise AttentionError(f"{where}: K/V read the cached latent beside its up-projection {up.name}; not an MLA form cpcompile knows")
    b, _, s, feats = shape(up)
    dr, rank = shape(r)[-1], shape(c)[-1]
    if known is not None:
        dims = (known.heads * known.per_head, known.rank, known.rope, known.dn + known.rope, known.dv)
        if dims != (feats, rank, dr, shape(site.key)[-1], shape(site.value)[-1]):
            raise AttentionError(f"{where}: this graph's MLA dims {(feats, rank, dr)} differ from the ones read at capture "
                                 f"{dims[:3]}; the model changed after cpcompile.parallelize")
        return dataclasses.replace(known, up=up)
    width = feats + dr
    need = 8 * b * s * (feats + dr + 2 * shape(site.query)[1] * (shape(site.key)[-1] + shape(site.value)[-1]))
    if need > PROBE_BYTES:
        raise AttentionError(
            f"{where}: reading this MLA layer's structure would evaluate its expansion over {b} x {s} slots "
            f"({need / 2**30:.1f} GiB); cpcompile.parallelize reads it once on a small capture. Use parallelize, or "
            "call the backend first with a small batch and max_length"
        )
    slot = (torch.arange(b * s, dtype=torch.float64) * width).view(b, 1, s, 1)
    env = {up: slot + 1 + torch.arange(feats, dtype=torch.float64), r: slot + 1 + feats + torch.arange(dr, dtype=torch.float64)}
    env = evaluate(region, env, torch.Generator().manual_seed(0), f"from the cached latent to {where}'s K/V")
    k, v = _decode(env[site.key], width, b, s, where, "K"), _decode(env[site.value], width, b, s, where, "V")
    heads = k.shape[0]
    if v.shape[0] != heads or shape(site.query)[1] != heads:
        raise AttentionError(f"{where}: {shape(site.query)[1]} query heads over {heads} expanded K heads and {v.shape[0]} V heads; "
                             "cpcompile absorbs MLA with one K/V head per query head")
    from_y = k < feats  # [H, Dk]
    if not (from_y == from_y[0]).all() or not (k[:, ~from_y[0]] == k[0, ~from_y[0]]).all():
        raise AttentionError(f"{where}: the heads' K read the cached rope key differently; not an MLA form cpcompile knows")
    nope_cols = from_y[0].nonzero().flatten()
    rope_src = k[0, ~from_y[0]] - feats  # rope feature each rope column of K reads
    if sorted(rope_src.tolist()) != list(range(dr)) or (v >= feats).any():
        raise AttentionError(f"{where}: K must read each rope feature once and V none; not an MLA form cpcompile knows")
    per_head = feats // heads
    k_cols, v_cols = _per_head_run(k[:, nope_cols], per_head, where, "k_nope"), _per_head_run(v, per_head, where, "V")
    rope_cols = (~from_y[0]).nonzero().flatten()[rope_src.argsort()]
    return LatentKV(up, heads, per_head, k_cols, v_cols, tuple(nope_cols.tolist()), tuple(rope_cols.tolist()), rank, dr)


def latent_layers(sites: list[AttentionSite]) -> frozenset[int]:
    """The layers whose cache holds an MLA latent (they get cpcompile's joint latent buffer)."""
    return frozenset(s.index for s in sites if s.latent is not None)


def _latent_input(n):
    while is_op(n, "to") or is_op(n, "contiguous"):
        n = n.args[0]
    return n


def written_region(dsts: list[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """The nodes that compute `dsts` back to `stop`, including in-place writes into views of them
    (`key[..., :Dn].copy_(k_nope)`: FX's inputs alone miss that dataflow)."""
    region = set(dsts)
    for d in dsts:
        region |= ancestors(d, lambda n: n in stop) - stop
    grew = True
    while grew:
        grew = False
        for n in list(region):
            for view in n.users:
                if view in region or not (is_op(view, "getitem") or is_op(view, "reshape")):
                    continue
                for w in view.users:
                    if w.op == "call_method" and w.target.endswith("_") and w.args[0] is view and w not in region:
                        region |= {view, w} | (ancestors(w, lambda m: m in stop) - stop)
                        grew = True
    return region


def _decode(x: torch.Tensor, width: int, b: int, s: int, where: str, what: str) -> torch.Tensor:
    """[B, H, S, D] of probe codes -> [H, D] source features, checked to be pure data movement
    within each (row, slot)."""
    if x.dim() != 4 or tuple(x.shape[::2]) != (b, s):
        raise AttentionError(f"{where}: {what} of shape {tuple(x.shape)} is not [B, H, S, D] over the cached slots")
    code = x - 1
    exact = torch.isfinite(code) & (code == code.round()) & (code >= 0)
    slot = torch.arange(b * s, dtype=torch.float64).view(b, 1, s, 1)
    if not exact.all() or not ((code // width) == slot).all():
        raise AttentionError(
            f"{where}: {what} is not a per-slot selection of the latent up-projection's features and the rope key "
            "(arithmetic or mixing between the cache read and the attention); not an MLA form cpcompile can absorb"
        )
    feats = (code % width).long()
    if not (feats == feats[:1, :, :1]).all():
        raise AttentionError(f"{where}: {what} selects different features for different rows or slots")
    return feats[0, :, 0]


def _per_head_run(idx: torch.Tensor, per_head: int, where: str, what: str) -> tuple[int, int]:
    """[H, D] feature indices -> (a, a + D) if head h reads features h*P + a .. h*P + a + D - 1."""
    h, d = idx.shape
    a = int(idx[0, 0]) if d else 0
    want = torch.arange(h)[:, None] * per_head + a + torch.arange(d)[None, :]
    if d == 0 or not torch.equal(idx, want) or a + d > per_head:
        raise AttentionError(f"{where}: each head's {what} is not a contiguous run of {per_head} up-projection features per head")
    return a, a + d


def expands(lat: LatentKV, lq: int, slots: int) -> bool:
    """True when the expanded form costs fewer FLOPs than the absorbed one for `lq` query tokens over
    `slots` local slots (per rank, multiply-adds):
        absorbed = H * Lq * (Dn*R + S*(R + Dr) + S*R + R*Dv)
        expanded = S * R * H * (Dn + Dv) + H * Lq * S * (Dn + Dr + Dv)
    At DeepSeek-V3's dims (R=512, Dr=64, Dn=Dv=128) over 32k local slots, expanded wins from 170
    query tokens: long prefill chunks expand, decode never does."""
    h, r, dr, dn, dv, s = lat.heads, lat.rank, lat.rope, lat.dn, lat.dv, slots
    absorbed = h * lq * (dn * r + s * (r + dr) + s * r + r * dv)
    expanded = s * r * h * (dn + dv) + h * lq * s * (dn + dr + dv)
    return expanded < absorbed


def _cols(g: fx.Graph, x: fx.Node, cols: tuple[int, ...]) -> fx.Node:
    """x[..., cols]: a slice when they are a run, else an index_select."""
    if list(cols) == list(range(cols[0], cols[0] + len(cols))):
        return insert_call(g, operator.getitem, (x, (Ellipsis, slice(cols[0], cols[0] + len(cols)))))
    from cpcompile.passes.shard_linears import graph_constant

    idx = graph_constant(x.graph.owning_module, torch.tensor(cols, device=val(x).device), "_cpcompile_cols")
    return insert_call(g, torch.index_select, (x, -1, idx))


def latent_inputs(g: fx.Graph, site: AttentionSite, lat: LatentKV, kv: fx.Node, expanded: bool):
    """The kernel's (q, k, v) for a latent site over this rank's slots; `kv` [B, 1, S, R + Dr] is
    the local cache `[c | r]` (`local_latent`)."""
    q = site.query
    q_nope, q_rope = _cols(g, q, lat.q_nope), _cols(g, q, lat.q_rope)
    if expanded:  # HF's form over the local slots: y = up(c) per slot, per-head K = [k_nope, r], V
        b, _, s, _ = shape(kv)
        c = insert_call(g, operator.getitem, (kv, (Ellipsis, slice(None, lat.rank))))
        r = insert_call(g, operator.getitem, (kv, (Ellipsis, slice(lat.rank, None))))
        y = insert_call(g, torch._C._nn.linear, (c, lat.weight, None))  # [B, 1, S, H*P]
        y = insert_call(g, torch.Tensor.transpose, (insert_call(g, torch.Tensor.view, (y, (b, s, lat.heads, lat.per_head))), 1, 2))
        k_nope = insert_call(g, operator.getitem, (y, (Ellipsis, slice(*lat.k_cols))))
        k_rot = insert_call(g, torch.Tensor.expand, (r, b, lat.heads, s, lat.rope))
        k = insert_call(g, torch.cat, ([k_nope, k_rot], -1))
        v = insert_call(g, operator.getitem, (y, (Ellipsis, slice(*lat.v_cols))))
        return insert_call(g, torch.cat, ([q_nope, q_rope], -1)), k, v
    w = insert_call(g, torch.Tensor.view, (lat.weight, (lat.heads, lat.per_head, lat.rank)))  # [H, P, R]
    w_uk = insert_call(g, operator.getitem, (w, (_ALL, slice(*lat.k_cols))))  # [H, Dn, R]
    q_lat = insert_call(g, torch.cat, ([insert_call(g, torch.matmul, (q_nope, w_uk)), q_rope], -1))  # [B, H, Lq, R + Dr]
    v = insert_call(g, operator.getitem, (kv, (Ellipsis, slice(None, lat.rank))))  # a view of the same rows
    return q_lat, kv, v


def local_latent(g: fx.Graph, read: fx.Node, s_local: int) -> fx.Node:
    """[B, 1, S_local, R + Dr] of a latent layer's cache read: a view of cpcompile's joint buffer, or
    (a cache laid out per tensor, as a hand-made KVCache for the backend string) the concatenation
    of both buffers' slots, a copy per step."""
    keys_buf, values_buf = read.args[:2]
    k = insert_call(g, operator.getitem, (keys_buf, (_ALL, _ALL, slice(None, s_local))))
    if len(read.args) > 6 and read.args[6]:
        return k
    v = insert_call(g, operator.getitem, (values_buf, (_ALL, _ALL, slice(None, s_local))))
    return insert_call(g, torch.cat, ([k, v], -1))


def up_project(g: fx.Graph, lat: LatentKV, o_lat: fx.Node, heads: tuple[int, int]) -> fx.Node:
    """o_lat [B, h, Lq, R] of query heads [h0, h1) -> o [B, h, Lq, Dv] through those heads' W_UV."""
    w = insert_call(g, torch.Tensor.view, (lat.weight, (lat.heads, lat.per_head, lat.rank)))
    w_uv = insert_call(g, operator.getitem, (w, (slice(*heads), slice(*lat.v_cols))))  # [h, Dv, R]
    return insert_call(g, torch.matmul, (o_lat, insert_call(g, torch.Tensor.transpose, (w_uv, -1, -2))))

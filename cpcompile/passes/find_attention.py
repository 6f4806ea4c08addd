"""Pass 1a — find attention sites in Dynamo's torch-level graph.

Cases handled:
  * `F.scaled_dot_product_attention(q, k, v, attn_mask=None|bool|float, is_causal, scale, enable_gqa)`
    with K/V given directly or through HF's `repeat_kv` (`x[:, :, None].expand(...).reshape(...)`).
  * The eager form (HF `eager_attention_forward`, used by Gemma 2):
    `matmul(q, k.transpose(2, 3)) -> (* scale | / d) -> (/ c -> tanh -> * c) -> (+ mask)
     -> softmax(-1) -> (.to) -> (dropout p=0) -> matmul(., v)`.
  * K/V read from cpcompile's cache (`cpcompile::kv_cache_read`, possibly through slot-wise
    ops such as DeepSeek-V3's latent up-projection) or computed in the graph (no cache).

Refused, with the layer and the reason (`AttentionError`): dropout p > 0, non-causal
attention with several query tokens and no mask (encoders), per-head masks (ALiBi-style
position biases), masks that are neither bool nor float.

This pass only reads the graph; it returns one `AttentionSite` per attention, in graph
order (= layer order).

Before (SDPA form, Llama, one layer):
    keys, values = cpcompile.kv_cache_read(l_keys, l_values, l_slot_pos, pos_new, 32)
    key = keys[:, :, None].expand(2, 2, 2, 32, 16).reshape(2, 4, 32, 16)
    value = ...same for values...
    o = torch._C._nn.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=0.25)
After: the graph is unchanged; the site records q, k=keys, v=values, mask, scale=0.25,
    softcap=0.0, n_rep=2, cache_read=kv_cache_read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from cpcompile.passes._fx import arg, ancestors, descendants, is_op, shape, single_user, source_line, strip_repeat_kv, val


class AttentionError(ValueError):
    """An attention site cpcompile cannot rewrite exactly. Never silently skipped."""


@dataclass
class AttentionSite:
    index: int  # attention order in the graph (= decoder layer order)
    form: str  # "sdpa" | "eager"
    output: fx.Node  # node whose value is the attention output [B, Hq, Lq, Dv]
    query: fx.Node  # [B, Hq, Lq, Dk]
    key: fx.Node  # [B, Hkv, S, Dk], repeat_kv stripped
    value: fx.Node  # [B, Hkv, S, Dv]
    mask: fx.Node | None  # [B|1, 1, Lq, S] bool or additive float
    is_causal: bool
    scale: float
    softcap: float = 0.0
    cache_read: fx.Node | None = None  # the cpcompile::kv_cache_read the K/V come from
    chain: list[fx.Node] = field(default_factory=list)  # eager-form nodes the rewrite replaces
    latent: "object | None" = None  # absorb_latent.LatentKV: K/V expanded from one cached latent head (MLA)

    @property
    def dims(self) -> dict[str, int]:
        b, hq, lq, dk = shape(self.query)
        _, hkv, s, _ = shape(self.key)
        return dict(B=b, Hq=hq, Hkv=hkv, Lq=lq, S=s, Dk=dk, Dv=shape(self.value)[-1])

    def describe(self) -> str:
        d = self.dims
        mask = "none" if self.mask is None else str(val(self.mask).dtype).replace("torch.", "")
        extras = [f"mask={mask}", f"causal={'yes' if self.is_causal or self.mask is not None else 'no'}"]
        if self.softcap:
            extras.append(f"softcap={self.softcap:g}")
        extras.append("cache=cpcompile" if self.cache_read is not None else "cache=none")
        if self.latent is not None:
            extras.append(self.latent.describe())
        heads = f"Hq={d['Hq']} Hkv={d['Hkv']}"
        dims = f"Dk={d['Dk']}" if d["Dk"] == d["Dv"] else f"Dk={d['Dk']} Dv={d['Dv']}"
        return f"{self.form} attention, {heads}, {dims}, scale={self.scale:.4g}, " + ", ".join(extras)


def find_attention_sites(gm: fx.GraphModule, latents: dict | None = None) -> list[AttentionSite]:
    """`latents`: layer -> `absorb_latent.LatentKV` read on an earlier graph of the model (reused, not re-probed)."""
    sites: list[AttentionSite] = []
    for node in gm.graph.nodes:
        if is_op(node, "sdpa"):
            sites.append(_sdpa_site(node, len(sites)))
        elif is_op(node, "softmax"):
            site = _eager_site(node, len(sites))
            if site is not None:
                sites.append(site)
    from cpcompile.passes.absorb_latent import find_latent  # it builds on this module's types

    for site in sites:
        _attach_cache(site)
        _check_site(site)
        site.latent = find_latent(site, (latents or {}).get(site.index))
    return sites


def _sdpa_site(node: fx.Node, index: int) -> AttentionSite:
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    is_causal = bool(arg(node, 5, "is_causal", False))
    scale = arg(node, 6, "scale")
    if dropout:
        raise AttentionError(f"attention #{index}: SDPA with dropout_p={dropout}; cpcompile rewrites inference attention only (dropout_p=0). Call model.eval().")
    k, rep_k = strip_repeat_kv(k)
    v, rep_v = strip_repeat_kv(v)
    if rep_k != rep_v:
        raise AttentionError(f"attention #{index}: key repeated {rep_k}x but value {rep_v}x; expected the same repeat_kv on both")
    if scale is None:
        scale = 1.0 / math.sqrt(shape(q)[-1])
    return AttentionSite(index, "sdpa", node, q, k, v, mask, is_causal, float(scale))


def _const(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _eager_site(softmax: fx.Node, index: int) -> AttentionSite | None:
    """Match the eager chain around `softmax`; None if this softmax is not an attention."""
    dim = arg(softmax, 1, "dim")
    if dim not in (-1, 3):
        return None
    chain = [softmax]
    # forward: softmax -> (.to) -> (dropout) -> matmul(w, v)
    out = single_user(softmax)
    while out is not None and (is_op(out, "to") or is_op(out, "dropout")):
        if is_op(out, "dropout"):
            p = arg(out, 1, "p", 0.5)
            training = arg(out, 2, "training", True)
            if p and training:
                raise AttentionError(f"attention #{index}: eager attention with dropout p={p} in training mode; call model.eval()")
        chain.append(out)
        out = single_user(out)
    if not (is_op(out, "matmul") and out.args[0] is chain[-1]):
        return None
    chain.append(out)
    v = out.args[1]
    # backward: (+ mask) <- (softcap) <- (* scale) <- matmul(q, k^T)
    x = softmax.args[0]
    mask = None
    if is_op(x, "add"):
        a, b = x.args[:2]
        if _reaches_qk(a):
            x, mask = a, b
        elif _reaches_qk(b):
            x, mask = b, a
        else:
            return None
    softcap = 0.0
    if is_op(x, "mul") and is_op(x.args[0], "tanh") and is_op(x.args[0].args[0], "truediv"):
        c_out, div = _const(x.args[1]), x.args[0].args[0]
        c_in = _const(div.args[1])
        if c_out is None or c_in is None or c_out != c_in:
            return None
        softcap, x = c_out, div.args[0]
    scale = 1.0
    if is_op(x, "mul") and _const(x.args[1]) is not None:
        scale, x = _const(x.args[1]), x.args[0]
    elif is_op(x, "mul") and _const(x.args[0]) is not None:
        scale, x = _const(x.args[0]), x.args[1]
    elif is_op(x, "truediv") and _const(x.args[1]) is not None:
        scale, x = 1.0 / _const(x.args[1]), x.args[0]
    if not is_op(x, "matmul"):
        return None
    q, kt = x.args[:2]
    if not (is_op(kt, "transpose") and sorted(d % 4 for d in kt.args[1:3]) == [2, 3]):
        return None
    k, rep_k = strip_repeat_kv(kt.args[0])
    v, rep_v = strip_repeat_kv(v)
    if rep_k != rep_v:
        raise AttentionError(f"attention #{index}: key repeated {rep_k}x but value {rep_v}x")
    _check_scores_private(x, softmax, index)
    return AttentionSite(index, "eager", out, q, k, v, mask, False, scale, softcap, chain=chain)


def _check_scores_private(qk: fx.Node, softmax: fx.Node, index: int) -> None:
    """The scores between q @ k^T and the softmax must feed nothing else: the rewrite replaces them
    with a kernel, and a second use (Granite-SWA's sink scale from logsumexp(scores)) would then read
    K/V that the rewrite sharded."""
    between = (descendants([qk], lambda n: n is softmax) & ancestors(softmax, lambda n: n is qk)) | {qk}
    between.discard(softmax)
    outside = [u for n in between for u in n.users if u is not softmax and u not in between]
    if outside:
        uses = "; ".join(f"{getattr(u.target, '__name__', u.target)} at {source_line(u)}" for u in outside[:3])
        raise AttentionError(
            f"attention #{index}: its scores (q @ k^T before the softmax) are also used outside the softmax, by {uses}. "
            "A term computed from the scores beside the softmax (an attention sink's log-sum-exp, for example) "
            "is not supported in this version; cpcompile refuses rather than rewrite half of it."
        )


def _reaches_qk(node) -> bool:
    """True if `node` is (a scaled/softcapped) q @ k^T rather than a mask."""
    for _ in range(6):
        if not isinstance(node, fx.Node):
            return False
        if is_op(node, "matmul"):
            return True
        if not (is_op(node, "mul") or is_op(node, "truediv") or is_op(node, "tanh")):
            return False
        node = node.args[0] if isinstance(node.args[0], fx.Node) else node.args[1]
    return False


def _attach_cache(site: AttentionSite) -> None:
    def stop(n: fx.Node) -> bool:
        return is_op(n, "kv_cache_read") or n.op == "placeholder"

    reads = {n for n in ancestors(site.key, stop) | ancestors(site.value, stop) | {site.key, site.value} if is_op(n, "kv_cache_read")}
    # key/value are getitems of the read: their ancestors include it
    if len(reads) > 1:
        raise AttentionError(f"attention #{site.index}: its keys/values come from {len(reads)} different cache layers; expected one")
    site.cache_read = next(iter(reads), None)


def _check_site(site: AttentionSite) -> None:
    d = site.dims
    where = f"attention #{site.index} ({site.form})"
    if d["Hq"] % d["Hkv"]:
        raise AttentionError(f"{where}: Hq={d['Hq']} is not a multiple of Hkv={d['Hkv']}")
    if site.mask is not None:
        m = val(site.mask)
        if m.dim() != 4 or m.shape[1] != 1:
            raise AttentionError(
                f"{where}: mask of shape {tuple(m.shape)}; expected [B, 1, Lq, S] shared by all heads. Per-head "
                "biases (ALiBi-style position bias) are not supported by cpcompile's attention kernel."
            )
        if not (m.dtype == torch.bool or m.dtype.is_floating_point):
            raise AttentionError(f"{where}: mask dtype {m.dtype}; expected bool or floating")
        if m.shape[-1] != d["S"] and site.cache_read is None:
            raise AttentionError(f"{where}: mask covers {m.shape[-1]} keys but the attention reads {d['S']}")
    elif not site.is_causal and d["Lq"] > 1:
        raise AttentionError(
            f"{where}: {d['Lq']} query tokens attend without a mask and without is_causal: this is bidirectional "
            "(encoder) attention. cpcompile parallelizes causal decoder self-attention only."
        )

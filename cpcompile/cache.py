"""The sharded KV cache: static per-rank buffers holding only this CP rank's slots.

A `transformers` `Cache` whose layers keep, per attention layer,

    keys       [B, Hkv_local, S_local + 1, Dk]   # last slot: the sink for tokens other ranks own
    values     [B, Hkv_local, S_local + 1, Dv]
    slot_pos   [S_local + 1] int64                # global position each slot holds, -1 = empty
    cumulative_length  int64 scalar tensor        # global number of tokens written

with `S_local = ceil(max_length / (cp·I))·I` (I = kv_interleave). The token at global position
`p` is written by CP rank `(p // I) % cp` at local slot `(p // (I·cp))·I + p % I` (the rule of
`cpcompile.kernels.layout`); the other CP ranks write it to the sink slot, which attention
never reads; so do positions past `max_length` (a prefill chunk's padding). The cache reports the **global** sequence length and a mask size of
`max_length`, so HF's position ids and masks are those of the single-device model.

**Latent layers** (MLA: DeepSeek-V2/V3 and the architectures sharing their `expand_kv`) cache
one latent head, `keys = kv_nope [B, 1, S, R]` and `values = k_rot [B, 1, S, Dr]`. cpcompile keeps
them in one joint buffer `keys [B, 1, S_local + 1, R + Dr]` (`values` is then empty), so the
absorbed attention reads `[kv_nope, k_rot]` as its 576-wide key and the first R columns of the same
rows as its value, with no per-step concatenation (FlashMLA's layout). One latent head cannot be
split by heads, so a latent layer's slots are split over all `tp·cp` ranks of a replica (its
`CacheLayout` has `cp = tp·cp`, `cp_rank` = the replica rank, `tp = 1`): Helix's KV parallelism.

`update` returns what HF's attention would read, `[B, Hkv, max_length, D]`, through
`cpcompile::kv_cache_read`: a marker op whose only implementation raises. The attention
rewrite pass replaces every attention that reads it by `cpcompile::attention_with_lse` over
the local slots, so a model that uses this cache outside a cpcompile-compiled forward (eager,
or another torch.compile backend) fails loudly instead of attending to the wrong slots.
Static shapes: no recompiles across decode steps, CUDA-graph friendly (same scheme as HF's
`StaticLayer`, whose `cumulative_length` tensor we mirror).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from cpcompile.kernels.layout import kv_head_range, local_slot, owner_rank


@dataclass(frozen=True)
class CacheLayout:
    """Where the KV of one attention layer lives on this rank."""

    max_length: int  # global capacity in tokens
    cp: int = 1
    cp_rank: int = 0
    kv_interleave: int = 1
    tp: int = 1
    tp_rank: int = 0

    @property
    def local_slots(self) -> int:
        if self.cp == 1:
            return self.max_length
        block = self.cp * self.kv_interleave
        return math.ceil(self.max_length / block) * self.kv_interleave

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """[start, stop) of the KV heads this TP rank keeps (`layout.kv_head_range`)."""
        return kv_head_range(num_kv_heads, self.tp, self.tp_rank)


_READ_OUTSIDE_CPCOMPILE = (
    "cpcompile's KV cache was read by an attention that cpcompile did not rewrite. The cache "
    "holds only this rank's slots, so HF's own attention over it would be wrong. Run the model "
    "through cpcompile.parallelize(...) or torch.compile(..., backend='cpcompile'); do not call "
    "it eagerly or with another backend while it holds a cpcompile.KVCache."
)


@torch.library.custom_op("cpcompile::kv_cache_read", mutates_args=())
def kv_cache_read(
    keys: torch.Tensor, values: torch.Tensor, slot_pos: torch.Tensor, pos_new: torch.Tensor, max_length: int, num_heads: int,
    joint: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marker: 'attention reads this layer's cache as [B, num_heads, max_length, D]' (global
    heads and length: the single-device view). `joint > 0`: a latent layer, whose `keys` buffer
    holds keys in its first `joint` columns and values in the rest (`values` is unused). Never executes."""
    raise RuntimeError(_READ_OUTSIDE_CPCOMPILE)


@kv_cache_read.register_fake
def _(keys, values, slot_pos, pos_new, max_length, num_heads, joint=0):
    b, _, _, dk = keys.shape
    dv = values.shape[-1]
    if joint:
        dk, dv = joint, dk - joint
    return keys.new_empty(b, num_heads, max_length, dk), keys.new_empty(b, num_heads, max_length, dv)


class KVCacheLayer(CacheLayerMixin):
    """One attention layer's slots on this rank (see the module docstring for the layout)."""

    is_compileable = True
    is_sliding = False
    supports_early_init = True

    def __init__(self, layout: CacheLayout, latent: bool = False):
        super().__init__()
        self.layout = layout
        self.latent = latent  # one joint [keys | values] buffer (module docstring)
        self.max_cache_len = layout.max_length
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """`key_states`/`value_states` carry the model's global KV heads; this rank keeps its TP share."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.global_heads = key_states.shape[:2]
        self.head_range = self.layout.kv_heads(self.global_heads)
        self.num_heads = self.head_range[1] - self.head_range[0]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        n = self.layout.local_slots + 1  # + the sink slot
        if self.latent and self.num_heads != 1:
            raise ValueError(f"KVCache: a latent (MLA) layer caches one head, this one writes {self.num_heads}")
        dk, dv = (self.k_head_dim + self.v_head_dim, 0) if self.latent else (self.k_head_dim, self.v_head_dim)
        self.keys = torch.zeros(self.batch_size, self.num_heads, n, dk, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(self.batch_size, self.num_heads, n, dv, dtype=self.dtype, device=self.device)
        self.slot_pos = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.slot_pos, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        lay = self.layout
        n_new = key_states.shape[-2]
        pos_new = torch.arange(n_new, device=self.device) + self.cumulative_length  # [T] global positions
        # Positions past max_length exist only as the padding of a last prefill chunk (the serving
        # engine rewinds them, and causality hides them from every real token): the sink takes them.
        mine = (owner_rank(pos_new, lay.cp, lay.kv_interleave) == lay.cp_rank) & (pos_new < lay.max_length)
        dest = torch.where(mine, local_slot(pos_new, lay.cp, lay.kv_interleave), lay.local_slots)  # [T]
        h0, h1 = self.head_range
        if (h0, h1) != (0, self.global_heads):  # this TP rank's KV heads only
            key_states, value_states = key_states[:, h0:h1], value_states[:, h0:h1]
        if self.latent:
            self.keys.index_copy_(2, dest, torch.cat([key_states, value_states], -1).to(self.dtype))
        else:
            self.keys.index_copy_(2, dest, key_states.to(self.dtype))
            self.values.index_copy_(2, dest, value_states.to(self.dtype))
        self.slot_pos.index_copy_(0, dest, pos_new)
        self.cumulative_length.add_(n_new)
        return torch.ops.cpcompile.kv_cache_read(
            self.keys, self.keys if self.latent else self.values, self.slot_pos, pos_new, lay.max_length, self.global_heads,
            self.k_head_dim if self.latent else 0,
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.layout.max_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.layout.max_length

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.slot_pos.fill_(-1)
        self.cumulative_length.zero_()

    def rewind(self, n: int) -> None:
        """Forget the last `n` tokens written (the padding of a prefill chunk): their slots hold
        position -1 again, so attention never reads them, and the next write lands there."""
        if n <= 0:
            return
        self.cumulative_length.sub_(n)
        if self.is_initialized:
            self.slot_pos.masked_fill_(self.slot_pos >= self.cumulative_length, -1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys.copy_(self.keys.index_select(0, beam_idx.to(self.device)))
            self.values.copy_(self.values.index_select(0, beam_idx.to(self.device)))


class KVCache(Cache):
    """cpcompile's sharded, static KV cache (one `KVCacheLayer` per decoder layer).

    `KVCache(num_layers, max_length, cp=..., cp_rank=..., kv_interleave=...)`; buffers are
    allocated on the first write (batch size, heads, head dims and dtype come from the model).
    `latent`: the layers that cache MLA latents (`latent_layers(analysis)`): one joint buffer each,
    slots split over all `tp·cp` ranks (module docstring).
    """

    def __init__(
        self,
        num_layers: int,
        max_length: int,
        *,
        cp: int = 1,
        cp_rank: int = 0,
        kv_interleave: int = 1,
        tp: int = 1,
        tp_rank: int = 0,
        latent: frozenset[int] | set[int] = frozenset(),
    ):
        if max_length < 1:
            raise ValueError(f"KVCache: max_length={max_length}; expected a positive number of tokens")
        if not 0 <= cp_rank < cp:
            raise ValueError(f"KVCache: cp_rank={cp_rank} is outside 0..{cp - 1} for cp={cp}")
        if kv_interleave < 1:
            raise ValueError(f"KVCache: kv_interleave={kv_interleave}; expected >= 1")
        if not 0 <= tp_rank < tp:
            raise ValueError(f"KVCache: tp_rank={tp_rank} is outside 0..{tp - 1} for tp={tp}")
        self.layout = CacheLayout(max_length, cp, cp_rank, kv_interleave, tp, tp_rank)
        # a latent layer's one head: slots over the replica's tp*cp ranks (Helix), replica rank = tp_rank*cp + cp_rank
        latent_layout = CacheLayout(max_length, tp * cp, tp_rank * cp + cp_rank, kv_interleave)
        super().__init__(layers=[KVCacheLayer(latent_layout, True) if i in latent else KVCacheLayer(self.layout)
                                 for i in range(num_layers)])

    @property
    def max_length(self) -> int:
        return self.layout.max_length

    @property
    def is_compileable(self) -> bool:
        """False on purpose, though the buffers are static: `generate()` then passes the 2D padding
        mask, which the serving engine cuts into prefill chunks, instead of building 4D masks
        outside the graph (what it does for a compileable cache)."""
        return False

    def allocate(self, model: torch.nn.Module, batch_size: int) -> "KVCache":
        """Allocate every layer's buffers for `batch_size` rows of `model` (see `kv_shapes`)."""
        return self.allocate_shapes(kv_shapes(model), batch_size, next(model.parameters()).device)

    def allocate_shapes(self, shapes: list[tuple], batch_size: int, device: torch.device) -> "KVCache":
        """`shapes`: per layer `(Hkv, Dk, Dv, dtype)`, as `kv_shapes` returns."""
        if len(shapes) != len(self.layers):
            raise ValueError(f"KVCache: built for {len(self.layers)} layers but the model has {len(shapes)} KV layers")
        for layer, (h, dk, dv, dtype) in zip(self.layers, shapes):
            if not layer.is_initialized:
                layer.lazy_initialization(
                    torch.empty(batch_size, h, 0, dk, dtype=dtype, device=device),
                    torch.empty(batch_size, h, 0, dv, dtype=dtype, device=device),
                )
        return self

    def rewind(self, n: int) -> None:
        """Forget the last `n` tokens of every layer (see `KVCacheLayer.rewind`)."""
        for layer in self.layers:
            layer.rewind(n)

    def kv_bytes(self) -> int:
        """Bytes of K/V this rank holds (allocated buffers, sink slot included)."""
        return sum(
            l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
            for l in self.layers
            if l.is_initialized
        )


def kv_shapes(model: torch.nn.Module) -> list[tuple[int, int, int, torch.dtype]]:
    """Per attention layer `(Hkv, Dk, Dv, dtype)` of what `model` writes into its KV cache.

    Learned by running one token of one row through `model` with a `DynamicCache`, so no
    shape is read from config fields whose names differ between architectures (DeepSeek-V3
    caches latents with `Dk != Dv`). Fake tensors would be cheaper, but some HF kernels
    (MoE grouped_mm on CPU) refuse them.
    """
    from transformers import DynamicCache

    from cpcompile._hf import cache_arg

    device = next(model.parameters()).device
    with torch.no_grad():
        probe = DynamicCache(config=model.config)
        try:
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), **{cache_arg(model): probe}, use_cache=True)
        except (ValueError, TypeError) as e:
            if "cache" not in str(e).lower():
                raise
            # MiniMax: "uses cache of its own and is not compatible with `cache` of type DynamicCache"
            raise ValueError(
                f"cpcompile: {type(model).__name__} refuses a transformers Cache ({str(e).splitlines()[0][:200]}). "
                "It keeps a cache class of its own, which cpcompile cannot replace with its sharded KV cache. "
                "Run this model without cpcompile."
            ) from e
    other = sorted({type(l).__name__ for l in probe.layers if not isinstance(getattr(l, "keys", None), torch.Tensor)})
    if other:  # a recurrent / linear-attention / conv state: nothing cpcompile can shard or rewrite
        raise ValueError(
            f"cpcompile: {type(model).__name__} keeps layer state that is not a key/value cache ({', '.join(other)}: "
            "state-space, linear-attention or convolution layers); cpcompile serves attention-only decoders with a "
            "KV cache. Run this model without cpcompile."
        )
    return [(l.keys.shape[1], l.keys.shape[-1], l.values.shape[-1], l.keys.dtype) for l in probe.layers]

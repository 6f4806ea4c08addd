"""Where a token's KV lives under decode context parallelism: the interleave rule.

The token at global position ``p`` lives on CP rank ``(p // I) % cp`` at local slot
``(p // (I * cp)) * I + p % I``, with ``I = kv_interleave`` (default 1). Runs of ``I``
consecutive tokens go round-robin over the ranks, so the shards stay balanced within
``I`` tokens as decode appends (interleave rule as in vLLM DCP). Within a rank, local
slot order is global position order.

Example, cp=2, I=2: positions 0 1 | 2 3 | 4 5 | 6 7 go to ranks 0 0 | 1 1 | 0 0 | 1 1;
rank 0 holds positions [0, 1, 4, 5] in slots [0, 1, 2, 3].

Every function here accepts Python ints or integer tensors for positions.
"""

from __future__ import annotations

import torch


def _check_mesh(cp: int, kv_interleave: int, cp_rank: int | None = None) -> None:
    if cp < 1:
        raise ValueError(f"layout: cp={cp}; expected cp >= 1")
    if kv_interleave < 1:
        raise ValueError(f"layout: kv_interleave={kv_interleave}; expected kv_interleave >= 1")
    if cp_rank is not None and not 0 <= cp_rank < cp:
        raise ValueError(f"layout: cp_rank={cp_rank}; expected 0 <= cp_rank < cp={cp}")


def owner_rank(p, cp: int, kv_interleave: int = 1):
    """CP rank that holds global position ``p``."""
    _check_mesh(cp, kv_interleave)
    return (p // kv_interleave) % cp


def local_slot(p, cp: int, kv_interleave: int = 1):
    """Local slot index of global position ``p`` on its owner rank."""
    _check_mesh(cp, kv_interleave)
    return (p // (kv_interleave * cp)) * kv_interleave + p % kv_interleave


def kv_head_range(num_kv_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the KV heads TP rank `tp_rank` keeps: Hkv/tp of them, or, when tp > Hkv
    (and Hkv divides tp), the one head its query heads read (DESIGN.md section 2)."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return tp_rank * per, (tp_rank + 1) * per
    h = tp_rank // (tp // num_kv_heads)
    return h, h + 1


def shard_positions(seq_len: int, cp: int, cp_rank: int, kv_interleave: int = 1) -> torch.Tensor:
    """Global positions (ascending, int64) among ``0..seq_len-1`` held by ``cp_rank``.

    Entry ``j`` is the position stored in local slot ``j``.
    """
    _check_mesh(cp, kv_interleave, cp_rank)
    p = torch.arange(seq_len, dtype=torch.int64)
    return p[owner_rank(p, cp, kv_interleave) == cp_rank]


def slot_positions(num_slots: int, cp: int, cp_rank: int, kv_interleave: int = 1) -> torch.Tensor:
    """Global position each of ``num_slots`` local slots of ``cp_rank`` would hold. [num_slots] int64

    The inverse of ``local_slot`` on this rank; ``shard_positions(n, ...)`` is the prefix
    of this that lies below ``n``.
    """
    _check_mesh(cp, kv_interleave, cp_rank)
    j = torch.arange(num_slots, dtype=torch.int64)
    return ((j // kv_interleave) * cp + cp_rank) * kv_interleave + j % kv_interleave

"""The interleave rule: owner rank and local slot of each global position."""

import pytest
import torch

from cpcompile.kernels.layout import local_slot, owner_rank, shard_positions, slot_positions


def test_hand_example():
    # cp=2, I=2: positions 0 1 | 2 3 | 4 5 | 6 7 | 8 9 go to ranks 0 0 | 1 1 | 0 0 | 1 1 | 0 0.
    p = torch.arange(10)
    assert owner_rank(p, 2, 2).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    assert local_slot(p, 2, 2).tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5]
    assert shard_positions(10, 2, 0, 2).tolist() == [0, 1, 4, 5, 8, 9]
    assert shard_positions(10, 2, 1, 2).tolist() == [2, 3, 6, 7]
    assert slot_positions(5, 2, 1, 2).tolist() == [2, 3, 6, 7, 10]
    assert owner_rank(7, 3, 1) == 1 and local_slot(7, 3, 1) == 2  # plain ints work too


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("I", [1, 2, 3])
@pytest.mark.parametrize("seq_len", [0, 1, 7, 50])
def test_partition_and_inverse(cp, I, seq_len):
    shards = [shard_positions(seq_len, cp, r, I) for r in range(cp)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(seq_len))  # a partition
    for r, pos in enumerate(shards):
        assert pos.dtype == torch.int64 and torch.equal(pos, pos.sort().values)
        assert (owner_rank(pos, cp, I) == r).all()
        assert torch.equal(local_slot(pos, cp, I), torch.arange(len(pos)))  # slots are dense, in order
        assert torch.equal(slot_positions(len(pos) + 5, cp, r, I)[: len(pos)], pos)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= I  # balanced within I tokens


def test_bad_mesh():
    with pytest.raises(ValueError, match="cp_rank=2; expected 0 <= cp_rank < cp=2"):
        shard_positions(10, 2, 2)
    with pytest.raises(ValueError, match="kv_interleave=0"):
        slot_positions(4, 2, 0, 0)

"""The test world itself, and which functional collectives gloo runs on CPU (eager and compiled).

Inputs are rank-dependent (`_input(rank)`); expected values are computed here from all ranks'
inputs with plain torch, and one literal per collective pins the arithmetic.
"""

import os
import pickle
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from cpcompile.testing import World, WorldError


def _input(rank: int, world: int) -> torch.Tensor:
    return torch.arange(4.0 * world).reshape(2 * world, 2) + 100 * rank  # [2n, 2]


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def test_all_reduce_and_rank_order(world2, world4):
    assert world2.run(_rank_and_sum) == [(0, 2, 3.0), (1, 2, 3.0)]
    assert world4.run(_rank_and_sum) == [(r, 4, 10.0) for r in range(4)]  # 1 + 2 + 3 + 4


def _fail_on(bad_rank: int, tag: str):
    if dist.get_rank() == bad_rank:
        raise ValueError(f"deliberate failure {tag}")
    return dist.get_rank()


def test_raising_rank_reports_its_traceback_and_world_survives(world2):
    with pytest.raises(WorldError) as info:
        world2.run(_fail_on, 1, "xyz-17")
    msg = str(info.value)
    assert "1 of 2 ranks raised" in msg and "--- rank 1 ---" in msg and "--- rank 0 ---" not in msg
    assert "ValueError: deliberate failure xyz-17" in msg and "in _fail_on" in msg  # the rank's own traceback
    assert list(info.value.tracebacks) == [1]
    assert world2.run(_rank_and_sum) == [(0, 2, 3.0), (1, 2, 3.0)]  # same world, still usable


def _fail_then_all_reduce():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 skipped the collective")
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 waits here for rank 1 forever
    return t.item()


def _pid():
    return os.getpid()


def test_hang_times_out_and_next_run_restarts():
    with World(2) as world:
        pids = world.run(_pid)
        start = time.monotonic()
        with pytest.raises(WorldError) as info:
            world.run(_fail_then_all_reduce, timeout_s=2)
        assert time.monotonic() - start < 15
        msg = str(info.value)
        assert "timed out after 2 s" in msg and "ranks [0] never answered" in msg
        assert "rank 1 skipped the collective" in msg  # the rank that did fail is shown
        assert world.run(_rank_and_sum) == [(0, 2, 3.0), (1, 2, 3.0)]
        assert set(world.run(_pid)).isdisjoint(pids)  # a fresh set of processes


def _exit_on_rank1():
    if dist.get_rank() == 1:
        os._exit(3)  # a crash: no traceback, no reply
    return dist.get_rank()


def test_dead_rank_tears_down_and_next_run_restarts(world2):
    with pytest.raises(WorldError, match=r"rank\(s\) \[1\] died while running _exit_on_rank1 .*exit codes \{1: 3\}"):
        world2.run(_exit_on_rank1, timeout_s=60)
    assert world2.run(_rank_and_sum) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_unpicklable_function_fails_in_the_parent(world2):
    with pytest.raises((pickle.PicklingError, AttributeError), match="pickle"):  # AttributeError: a local object
        world2.run(lambda: 1)


# Functional collectives (what the distributed passes emit), one function calling all four.
def _four_collectives(x: torch.Tensor, group) -> dict[str, torch.Tensor]:
    return {
        "all_reduce": fc.all_reduce(x, "sum", group),
        "all_gather_tensor": fc.all_gather_tensor(x, 0, group),
        "all_to_all_single": fc.all_to_all_single(x, None, None, group),
        "reduce_scatter_tensor": fc.reduce_scatter_tensor(x, "sum", 0, group),
    }


def _run_four(lowering: str) -> dict[str, torch.Tensor]:
    fn = _four_collectives if lowering == "eager" else torch.compile(_four_collectives, backend=lowering, fullgraph=True)
    x = _input(dist.get_rank(), dist.get_world_size())
    out = fn(x, dist.group.WORLD)
    return {k: fc.wait_tensor(v).clone() for k, v in out.items()}


def _expected(rank: int, n: int) -> dict[str, torch.Tensor]:
    xs = [_input(r, n) for r in range(n)]
    total = sum(xs)
    return {
        "all_reduce": total,
        "all_gather_tensor": torch.cat(xs),
        "all_to_all_single": torch.cat([x.chunk(n)[rank] for x in xs]),  # chunk `rank` of every rank
        "reduce_scatter_tensor": total.chunk(n)[rank],
    }


@pytest.mark.parametrize("lowering", ["eager", "aot_eager", "inductor"])
def test_functional_collectives_on_gloo(world2, lowering):
    results = world2.run(_run_four, lowering)
    for rank, got in enumerate(results):
        for name, want in _expected(rank, 2).items():
            torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=lambda m: f"{name} on rank {rank}: {m}")
    # literals for rank 1 (inputs [[0, 1], [2, 3], [4, 5], [6, 7]] + 100 * rank)
    assert results[1]["all_reduce"][0].tolist() == [100.0, 102.0]
    assert results[1]["all_to_all_single"].tolist() == [[4.0, 5.0], [6.0, 7.0], [104.0, 105.0], [106.0, 107.0]]
    assert results[1]["reduce_scatter_tensor"].tolist() == [[108.0, 110.0], [112.0, 114.0]]


def _mesh_groups(tp: int, cp: int):
    """This rank's (cp group, tp group) under rank = tp_rank * cp + cp_rank (DESIGN.md section 1)."""
    rank = dist.get_rank()
    cp_groups = [dist.new_group([t * cp + c for c in range(cp)]) for t in range(tp)]  # every rank creates every group
    tp_groups = [dist.new_group([t * cp + c for t in range(tp)]) for c in range(cp)]
    return cp_groups[rank // cp], tp_groups[rank % cp]


def _cp_tp_collectives():
    cp_group, tp_group = _mesh_groups(tp=2, cp=2)
    x = _input(dist.get_rank(), 2)  # [4, 2]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x):
        partial = fc.all_to_all_single(x, None, None, cp_group)  # Helix-style exchange within the cp group
        return fc.all_reduce(partial, "sum", tp_group), fc.all_gather_tensor(x, 0, cp_group)

    reduced, gathered = step(x)
    return fc.wait_tensor(reduced).clone(), fc.wait_tensor(gathered).clone()


def test_subgroups_of_the_rank_layout_compiled(world4):
    results = world4.run(_cp_tp_collectives)
    xs = [_input(r, 2) for r in range(4)]
    for rank, (reduced, gathered) in enumerate(results):
        tp_rank, cp_rank = divmod(rank, 2)
        cp_members = [tp_rank * 2 + c for c in range(2)]
        a2a = lambda t: torch.cat([xs[m].chunk(2)[cp_rank] for m in (t * 2, t * 2 + 1)])  # noqa: E731
        torch.testing.assert_close(reduced, a2a(0) + a2a(1), rtol=0, atol=0)  # tp group: same cp_rank
        torch.testing.assert_close(gathered, torch.cat([xs[m] for m in cp_members]), rtol=0, atol=0)
    assert results[3][0].tolist() == [[208.0, 210.0], [212.0, 214.0], [408.0, 410.0], [412.0, 414.0]]

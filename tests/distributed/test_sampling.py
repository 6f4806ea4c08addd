"""Sampling under parallelize on a persistent gloo world (cpcompile/lockstep.py, docs/distributed.md
"Sampling and the inputs checksum").

`generate(do_sample=True)` takes the first rank's RNG state on every rank that must agree, so:
ranks seeded differently sample the same tokens; those tokens are the single-device model's under
the first rank's seed (exact tokens, fp32); afterwards every rank holds the RNG state a single
device would. The inputs checksum blames the caller's input_ids for a prompt that differs and
cpcompile for tokens the ranks generated themselves that differ.
"""

import copy

import pytest
import torch

from cpcompile.testing import WorldError

MAX_LENGTH = 32
NEW_TOKENS = 12
PROMPT = 5


def _prompts(batch, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (batch, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


def _sample(model, ids, mask, seed):
    """`generate(do_sample=True)` after `torch.manual_seed(seed)`; the tokens and the RNG state after."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out, torch.get_rng_state()


def sample_on_rank(mesh: dict, rounds: list[list[int]], batch: int):
    """For each round of seeds: rank r seeds `seeds[r]` and samples with the parallel model; the
    single-device reference samples under the seed of the first rank of r's group (every rank; a
    replica's with dp_inputs='local'). One parallelize for all rounds (compiling is the cost)."""
    import torch.distributed as dist

    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    rank = dist.get_rank()
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    local = mesh.get("dp_inputs") == "local"
    per_replica = mesh.get("tp", 1) * mesh.get("cp", 1)
    replica = rank // per_replica
    ids, mask = _prompts(batch, seed=replica if local else 0)  # local: each replica its own requests
    first = replica * per_replica if local else 0
    parallelize(model, **mesh, max_length=MAX_LENGTH, lowering="eager")
    results = []
    for seeds in rounds:
        got, got_rng = _sample(model, ids, mask, seeds[rank])
        want, want_rng = _sample(ref, ids, mask, seeds[first])
        other, _ = _sample(ref, ids, mask, seeds[first] + 1)
        results.append(dict(got=got, want=want, other=other, rng_as_single_device=torch.equal(got_rng, want_rng)))
    return results


def _check(results, groups):
    for group in groups:
        for r in group:
            res = results[r]
            assert torch.equal(res["got"], results[group[0]]["got"]), f"rank {r} sampled other tokens than rank {group[0]}"
            assert torch.equal(res["got"], res["want"]), f"rank {r}: not the single-device samples under the seed"
            assert not torch.equal(res["want"], res["other"])  # the seed decides the samples (they are not greedy)
            assert res["rng_as_single_device"], f"rank {r}: the RNG state after generate() is not a single device's"


@pytest.fixture(scope="module")
def tp2_rounds(world2):
    """tp=2: ranks seeded differently (11, 22), then every rank seeded 7, on one parallelized model."""
    return world2.run(sample_on_rank, dict(tp=2), [[11, 22], [7, 7]], 2)


def test_ranks_seeded_differently_sample_the_same_tokens(tp2_rounds):
    _check([r[0] for r in tp2_rounds], [[0, 1]])  # and they are the single-device samples under rank 0's seed


def test_manual_seed_on_every_rank_reproduces_single_device(tp2_rounds):
    _check([r[1] for r in tp2_rounds], [[0, 1]])  # a second generate() on the same model, too


def test_dp_global_replicas_sample_the_same_tokens(world2):
    # every rank gets the whole batch back (the replicas' logits are all-gathered): all ranks agree
    results = world2.run(sample_on_rank, dict(dp=2), [[5, 6]], 3)
    _check([r[0] for r in results], [[0, 1]])


def share_on_rank(mesh: dict, seeds: list[int]):
    """`generate()`'s RNG agreement alone, on the groups parallelize makes (no model: compiling four
    ranks on two cores is the cost the sampling tests above already pay end to end)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from cpcompile.distributed import rank_context
    from cpcompile.lockstep import agreeing_group, share_rng_state
    from cpcompile.options import Options

    options = Options.from_dict(mesh)
    ctx = rank_context(options, torch.device("cpu"))
    agreeing = agreeing_group(SimpleNamespace(options=options, ctx=ctx))
    torch.manual_seed(seeds[dist.get_rank()])
    if agreeing is not None:
        share_rng_state(*agreeing, torch.device("cpu"))
    return torch.rand(4)


@pytest.mark.parametrize("mesh, first", [
    (dict(dp=2, tp=2, dp_inputs="local"), [0, 0, 2, 2]),  # each replica takes its first rank's stream
    (dict(dp=2, tp=2), [0, 0, 0, 0]),  # global: one stream for all
    (dict(dp=4, dp_inputs="local"), [0, 1, 2, 3]),  # a replica of one rank keeps its own
])
def test_rng_state_is_shared_within_the_ranks_that_must_agree(world4, mesh, first):
    seeds = [1, 2, 3, 4]
    got = world4.run(share_on_rank, mesh, seeds)
    for r, f in enumerate(first):
        with torch.random.fork_rng():
            torch.manual_seed(seeds[f])
            want = torch.rand(4)
        assert torch.equal(got[r], want), f"rank {r} does not draw from rank {f}'s stream"


def generate_on_rank(diverge: bool):
    """tp=2 greedy generate. diverge=False: the ranks pass different prompts; True: the same prompt,
    but rank 1's logits are negated (a stand-in for a parallelization error: it picks other tokens)."""
    import torch.distributed as dist

    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    rank = dist.get_rank()
    model = parallelize(tiny_model("llama"), tp=2, max_length=MAX_LENGTH, lowering="eager")
    ids, mask = _prompts(1, seed=rank if not diverge else 0)
    if diverge and rank == 1:
        import functools

        forward = model.forward

        @functools.wraps(forward)  # the same signature: generate() passes the same arguments on both ranks
        def negated(*args, **kwargs):
            out = forward(*args, **kwargs)
            out["logits"] = -out["logits"]
            return out

        model.forward = negated
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4, pad_token_id=0)


def _raised(err: WorldError) -> list[str]:
    """The last line of each rank's traceback: the exception it raised, with its message."""
    assert sorted(err.tracebacks) == [0, 1]
    return [tb.strip().splitlines()[-1] for _, tb in sorted(err.tracebacks.items())]


def test_different_prompts_blame_the_input_ids(world2):
    with pytest.raises(WorldError) as info:
        world2.run(generate_on_rank, False)
    for line in _raised(info.value):
        assert line.startswith("cpcompile.lockstep.InputsDiffer: ")
        assert "sees inputs that differ from other ranks" in line and "must pass the same input_ids" in line


def test_divergence_at_a_decode_step_blames_cpcompile(world2):
    with pytest.raises(WorldError) as info:
        world2.run(generate_on_rank, True)
    for line in _raised(info.value):
        assert line.startswith("cpcompile.lockstep.RanksDiverged: ")
        assert "the ranks' own outputs diverged at decode step 1 of generate()" in line
        assert f"the token fed back at position {PROMPT}" in line
        assert "a cpcompile parallelization error, not a problem with your inputs" in line
        assert "cpcompile.explain(" in line


def forward_with_keep():
    """tp=2, the same prompt on both ranks, but rank 1 asks for the last token's logits only: the
    ranks would run different graphs (the LM head's all-gather differs), so the checksum refuses it."""
    import torch.distributed as dist

    from cpcompile import parallelize
    from cpcompile.tiny import tiny_model

    model = parallelize(tiny_model("llama"), tp=2, max_length=MAX_LENGTH, lowering="eager", verify=False)
    ids, mask = _prompts(1, seed=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, logits_to_keep=dist.get_rank())


def test_ranks_calling_with_different_logits_to_keep_are_refused(world2):
    with pytest.raises(WorldError) as info:
        world2.run(forward_with_keep)
    for line in _raised(info.value):
        assert line.startswith("cpcompile.lockstep.InputsDiffer: ") and "logits_to_keep=" in line, line
        assert "every rank must call the model the same way" in line

"""Attention data parallel around the compiled graph (DESIGN.md sections 1 and 3, `dp > 1`).

Batch rows are split over the `dp` replicas; each replica runs attention (itself tp x cp
parallel) on its own rows and keeps KV only for them. This module is the host-side half:

  * `split_rows(B, dp)`: the rows of each replica in global mode, in order, the first `B % dp`
    replicas taking one more (ragged batches are allowed; `B < dp` is an error).
  * `take_rows(kwargs, ...)`: the forward's batched arguments cut to this replica's rows.
  * the marker op `cpcompile::replica_layout(x, rows, tokens)` tells the graph the layout of
    this step as constants (the rows and tokens of every replica); the passes `gather_replicas`
    and `split_tokens` read it and remove it. Eagerly it is the identity.
  * `exchange_layout`: in local mode under ffn='world_tp' the replicas tell each other their
    rows and tokens (one small all-gather over the dp group per step).
  * `agree_on_settings`: before `generate()` every rank compares its generation settings with
    the others; replicas that disagree would run different numbers of steps and hang in a
    collective, so they get an error naming the setting instead.
"""

from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist


@torch.library.custom_op("cpcompile::replica_layout", mutates_args=())
def _replica_layout(x: torch.Tensor, rows: list[int], tokens: list[int]) -> torch.Tensor:
    return x.clone()


@_replica_layout.register_fake
def _(x, rows, tokens):
    return torch.empty_like(x)


REPLICA_LAYOUT = torch.ops.cpcompile.replica_layout.default

BATCHED = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")
UNBATCHED = ("cache_position", "past_key_values", "use_cache", "logits_to_keep", "return_dict", "output_attentions",
             "output_hidden_states")


def split_rows(batch: int, dp: int) -> list[int]:
    if batch < dp:
        raise ValueError(
            f"cpcompile: a global batch of {batch} row(s) cannot be split over dp={dp} replicas (each replica needs at "
            f"least one row). Pass at least {dp} rows, use fewer replicas, or pass dp_inputs='local' to give each "
            "replica its own requests."
        )
    return [batch // dp + (1 if d < batch % dp else 0) for d in range(dp)]


def take_rows(kwargs: dict, batch: int, start: int, stop: int) -> dict:
    """This replica's rows of every batched argument. A mask may be a tensor or, as `generate()`
    prepares it for a static cache, a dict of 4D masks per layer type; a mask with one row
    broadcasts over the batch and is kept whole."""

    def rows(k, v):
        if isinstance(v, dict):
            return {name: rows(k, m) for name, m in v.items()}
        if not isinstance(v, torch.Tensor):
            return v
        if v.shape[0] == batch:
            return v[start:stop]
        if v.shape[0] == 1 and k == "attention_mask":
            return v
        raise ValueError(f"cpcompile: {k} has {v.shape[0]} rows but the batch has {batch}")

    out = dict(kwargs)
    for k, v in kwargs.items():
        if k in UNBATCHED or not isinstance(v, (torch.Tensor, dict)):
            continue
        if k not in BATCHED:
            raise ValueError(
                f"cpcompile: dp > 1 splits batched arguments by rows, and {k!r} is not one it knows ({BATCHED}); "
                "pass it per replica with dp_inputs='local'"
            )
        out[k] = rows(k, v)
    return out


def exchange_layout(rows: int, tokens: int, group) -> tuple[list[int], list[int]]:
    """Local mode: every replica's (rows, tokens) this step, over the dp group."""
    mine = torch.tensor([rows, tokens], dtype=torch.long)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [int(t[0]) for t in every], [int(t[1]) for t in every]


def generation_settings(model, kwargs: dict) -> dict:
    """The generation settings `generate(**kwargs)` will use (the config merged with kwargs)."""
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    settings = config.to_dict()
    for k in ("transformers_version", "_from_model_config", "_commit_hash"):
        settings.pop(k, None)
    return json.loads(json.dumps(settings, sort_keys=True, default=repr))


def agree_on_settings(model, kwargs: dict, group=None) -> None:
    """Every rank must run `generate()` with the same settings (steps are taken in lockstep)."""
    mine = generation_settings(model, kwargs)
    for k in ("logits_processor", "stopping_criteria"):  # the caller's own: by kind (objects don't compare)
        if kwargs.get(k):
            mine[k] = [type(p).__qualname__ for p in kwargs[k]]
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    diffs = sorted({k for s in every for k in set(s) | set(mine) if s.get(k) != mine.get(k)})
    if diffs:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} has {s.get(k)!r}" for r, s in enumerate(every)) for k in diffs[:5])
        raise ValueError(
            f"cpcompile: the ranks disagree about generation settings ({detail}). Every replica steps the model in "
            "lockstep with the others, so pass the same generation settings (max_new_tokens, sampling, stopping) on "
            "every rank; only the requests themselves may differ (dp_inputs='local')."
        )

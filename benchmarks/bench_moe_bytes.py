"""Weight bytes per rank as a fraction of one device, for full-size MoE configs, on the meta device.

Nothing is downloaded and no weight is allocated: each model is built from its config with its
parameters on meta (`cpcompile.empty_model`), traced on meta as `parallelize` does, and the plan
and every rank's shards are computed by the real passes (`capture`, `shard_weights`) for that
rank of the mesh. A rank's bytes = its shards (rows/columns/experts it keeps, vocab shards with
their zero padding) + every parameter the plan replicates. The goal (issue 12): at tp*cp = 8,
at most 1/8 of the weights plus what must stay replicated (norms, routers, biases), the
remainder stated in bytes. What a rank holds beyond that is reported beside it and attributed:
the q/k/v projections Helix's layout repeats (heads are split over tp only, so every CP rank of
a TP group holds the same ones, and a KV head sits on tp/Hkv ranks when tp > Hkv).

    python benchmarks/bench_moe_bytes.py [--json benchmarks/results/moe_bytes.json] [--configs mixtral,qwen3_moe]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
import transformers

from cpcompile.distributed import RankContext
from cpcompile.loading import empty_model
from cpcompile.options import Options
from cpcompile.capture import capture, meta_copy
from cpcompile.passes.plan import Mesh, MeshError, plan
from cpcompile.passes.shard_weights import shard_weights

CONFIGS = {  # the published configs' shapes (bf16)
    "mixtral": lambda: transformers.MixtralConfig(  # Mixtral-8x7B
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, dtype=torch.bfloat16),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(  # Qwen3-30B-A3B
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        tie_word_embeddings=False, dtype=torch.bfloat16),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(dtype=torch.bfloat16),  # DeepSeek-V3 (671B)
}
MESHES = [(8, 1, "tp"), (8, 1, "ep"), (4, 2, "tp"), (4, 2, "ep"), (2, 4, "ep")]  # (tp, cp, moe)


def _local_bytes(shard, elsize: int) -> int:
    out, inn = shard.full_shape
    if shard.kind == "column":
        n = len(shard.cols) * inn
    elif shard.kind == "row":
        n = out * len(shard.cols)
    elif shard.kind == "vocab":
        n = shard.local_rows * inn
    elif shard.kind == "expert":
        n = len(shard.cols) * out * inn
    else:  # expert-column / expert-row: every expert, some of its columns
        n = 0
    return n * elsize


ATTENTION_INPUTS = ("q", "k", "v", "qkv", "kv", "qk", "qv")


def rank_bytes(model, analysis, tp: int, cp: int, moe: str, rank: int) -> tuple[int, int, int]:
    """(bytes rank `rank` holds, bytes of parameters the plan replicates, bytes of q/k/v projections
    it holds beyond 1/(tp*cp) of them: Helix splits heads over tp only, so CP ranks repeat them, and
    a KV head is repeated on tp/Hkv ranks when tp > Hkv)."""
    params = dict(model.named_parameters())
    shards = shard_weights(analysis, RankContext(tp, cp, 1, "all_to_all", "tp", "parallel", moe, rank=rank))
    sharded = {n for s in shards.values() for n in (s.weight, s.bias) if n}
    replicated = sum(p.numel() * p.element_size() for n, p in params.items() if n not in sharded)
    held = replicated
    roles = {p.weight: p.role for p in analysis.roles.projections}
    n = tp * cp
    attention_extra = 0
    for s in shards.values():
        if roles.get(s.weight) in ATTENTION_INPUTS:
            full = params[s.weight].numel() * params[s.weight].element_size()
            attention_extra += _local_bytes(s, params[s.weight].element_size()) - full // n
        p = params[s.weight]
        el = p.element_size()
        if s.kind in ("expert-column", "expert-row"):
            e = p.shape[0]
            out, inn = s.full_shape
            held += e * len(s.cols) * (inn if s.kind == "expert-column" else out) * el
        else:
            held += _local_bytes(s, el)
        if s.bias:
            held += (len(s.cols) if s.kind != "row" else params[s.bias].numel()) * params[s.bias].element_size()
    return held, replicated, attention_extra


def measure(name: str) -> list[dict]:
    config = CONFIGS[name]()
    t0 = time.perf_counter()
    model = empty_model(config, dtype=torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    rows = []
    analysis = capture(meta_copy(model), Options())  # the roles do not depend on the mesh; the plan does
    for tp, cp, moe in MESHES:
        mesh = Mesh(tp, cp, 1, moe=moe)
        try:  # the plan for this mesh (validated), on the one capture
            planned = replace(analysis, placements=plan(analysis.roles, analysis.sites, mesh), mesh=mesh)
        except MeshError as e:
            first = str(e).splitlines()[1].strip()
            rows.append(dict(model=name, tp=tp, cp=cp, moe=moe, refused=first.split("]: ", 1)[-1] if "]: " in first else first))
            continue
        per_rank = [rank_bytes(model, planned, tp, cp, moe, r) for r in range(tp * cp)]
        held, replicated, attention_extra = max(per_rank)
        rows.append(dict(model=name, tp=tp, cp=cp, moe=moe, total_bytes=total, expert_bytes=experts,
                         max_rank_bytes=held, fraction=held / total, replicated_bytes=replicated,
                         goal_bytes=total // (tp * cp) + replicated, goal_met=held <= total // (tp * cp) + replicated,
                         excess_bytes=held - (total // (tp * cp) + replicated), attention_layout_bytes=attention_extra,
                         seconds=round(time.perf_counter() - t0, 1)))
    torch._dynamo.reset()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    print(f"{'model':<12} {'mesh':<14} {'GiB/rank':>9} {'of one device':>14} {'replicated MiB':>15} {'goal (1/n + repl.)':>19} "
          f"{'over goal MiB':>14} {'q/k/v repeated MiB':>19}")
    for name in args.configs.split(","):
        for r in measure(name):
            rows.append(r)
            mesh = f"tp{r['tp']}xcp{r['cp']} {r['moe']}"
            if "refused" in r:
                print(f"{name:<12} {mesh:<14} refused: {r['refused']}")
                continue
            print(f"{name:<12} {mesh:<14} {r['max_rank_bytes'] / 2**30:>9.2f} {r['fraction']:>13.4f}x "
                  f"{r['replicated_bytes'] / 2**20:>15.1f} {'met' if r['goal_met'] else 'NOT met':>19} "
                  f"{max(r['excess_bytes'], 0) / 2**20:>14.1f} {r['attention_layout_bytes'] / 2**20:>19.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Decode time per token of a MoE model, moe='tp' against moe='ep', side by side on one gloo world.

    python benchmarks/bench_moe.py [--ranks 2] [--batches 1,32] [--steps 16] [--rounds 3] [--lowering inductor] [--json F]

A Mixtral-shaped model (seeded random weights, fp32): hidden 256, 8 heads, 4 KV heads, 4 layers,
8 experts of intermediate 512, top-2, vocab 1024. On every rank of a `--ranks`-rank world (tp =
ranks, one intra-op thread each) the same model is parallelized twice, with moe='tp' (each
expert's intermediate dim split) and moe='ep' (8/ranks whole experts per rank). For each batch
(prompt 16 tokens): one untimed generate() per model (compiles), then `--rounds` rounds in which
each model, in turn (the order rotated per round, so both share the machine's load), runs
generate() with 1 and with 1 + `--steps` new tokens; decode time per token = the difference /
steps, the slowest rank's, median over rounds. Also reported: the decode graph's collectives and
their bytes per layer (the pass report), and the weight bytes per rank.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def build(seed: int = 0):
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def rank_main(a: dict) -> dict:
    import torch.distributed as dist

    from cpcompile import parallelize
    from cpcompile.sharding import weight_bytes

    torch.set_num_threads(1)
    base = build()
    models = {}
    for moe in ("tp", "ep"):
        m = copy.deepcopy(base)
        parallelize(m, tp=a["ranks"], moe=moe, max_length=64, max_batch=max(a["batches"]), lowering=a["lowering"], verify=False)
        models[moe] = m
    out = {"weight_bytes": {k: weight_bytes(m) for k, m in models.items()}, "full_bytes": weight_bytes(base), "runs": {}}
    g = torch.Generator().manual_seed(1)
    for b in a["batches"]:
        ids = torch.randint(3, 1000, (b, 16), generator=g)
        kw = dict(do_sample=False, pad_token_id=0)

        def timed(m, n):
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                seq = m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            return time.perf_counter() - t0, seq

        tokens, decode = {}, {}
        for moe, m in models.items():  # compiles this batch's prefill and decode graphs (decode last)
            tokens[moe] = timed(m, 1 + a["steps"])[1]
            decode[moe] = m._cpcompile.backend.reports[-1]
        times = {moe: [] for moe in models}
        for r in range(a["rounds"]):
            order = list(models) if r % 2 == 0 else list(reversed(list(models)))
            for moe in order:
                t1, _ = timed(models[moe], 1)
                tn, _ = timed(models[moe], 1 + a["steps"])
                times[moe].append((tn - t1) / a["steps"])
        out["runs"][b] = {
            moe: dict(decode_s=times[moe], collectives=decode[moe].counts["collectives"],
                      collective_bytes=decode[moe].counts["collective_bytes"])
            for moe in models
        }
        out["runs"][b]["same_tokens"] = torch.equal(tokens["tp"], tokens["ep"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lowering", default="inductor")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    a = dict(ranks=args.ranks, batches=[int(x) for x in args.batches.split(",")], steps=args.steps, rounds=args.rounds,
             lowering=args.lowering)
    from cpcompile.testing import World

    with World(args.ranks) as world:
        results = world.run(rank_main, a, timeout_s=3600)
    layers = 4
    r0 = results[0]
    print(f"Mixtral-shaped MoE (hidden 256, 8 experts of 512, top-2, 4 layers), tp={args.ranks}, lowering={args.lowering}")
    print(f"weight bytes per rank: moe=tp {r0['weight_bytes']['tp'] / r0['full_bytes']:.4f}x, "
          f"moe=ep {r0['weight_bytes']['ep'] / r0['full_bytes']:.4f}x of one device")
    print(f"{'batch':>5} {'moe':>4} {'ms/token':>9} {'ep/tp':>6}  collectives per layer (bytes)")
    rows = []
    for b in a["batches"]:
        med = {}
        for moe in ("tp", "ep"):
            slowest = [max(res["runs"][b][moe]["decode_s"][i] for res in results) for i in range(args.rounds)]
            med[moe] = statistics.median(slowest)
        for moe in ("tp", "ep"):
            run = r0["runs"][b][moe]
            per_layer = {k: (v / layers, run["collective_bytes"][k] / layers) for k, v in run["collectives"].items() if v}
            cell = ", ".join(f"{k} {c:g} ({int(by):,} B)" for k, (c, by) in per_layer.items())
            ratio = f"{med['ep'] / med['tp']:.2f}" if moe == "ep" else ""
            print(f"{b:>5} {moe:>4} {med[moe] * 1e3:>9.2f} {ratio:>6}  {cell}")
            rows.append(dict(batch=b, moe=moe, ms_per_token=med[moe] * 1e3, collectives=run["collectives"],
                             collective_bytes=run["collective_bytes"], same_tokens=r0["runs"][b]["same_tokens"]))
    print("(collectives per layer include the per-forward embedding all-reduce and LM head all-gather, divided by the layers)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, weight_fraction={k: v / r0["full_bytes"] for k, v in r0["weight_bytes"].items()}), f, indent=1)


if __name__ == "__main__":
    main()

"""What self-verification costs at start-up: `parallelize(verify=True)` against `verify=False`,
side by side in one process, and the first `generate()` after each (the probe compiles the graphs
a two-row, short-prompt generate() uses, so part of the cost moves rather than adds).

    python benchmarks/bench_verify.py [--arch llama] [--lowering inductor] [--reps 2] [--batch 2]

Prints one table: parallelize seconds, first generate() seconds, their sum, graphs compiled, per setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
# every run compiles the same graphs: without this, later runs would hit Inductor's on-disk cache
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

from cpcompile import parallelize  # noqa: E402
from cpcompile.tiny import tiny_model  # noqa: E402


def one(arch: str, lowering: str, verify: bool, batch: int) -> dict:
    torch._dynamo.reset()
    model = tiny_model(arch)
    t0 = time.perf_counter()
    parallelize(model, max_length=64, lowering=lowering, verify=verify)
    t1 = time.perf_counter()
    ids = torch.randint(3, 200, (batch, 8), generator=torch.Generator().manual_seed(0))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    t2 = time.perf_counter()
    return dict(parallelize=t1 - t0, generate=t2 - t1, total=t2 - t0, graphs=model._cpcompile.graphs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--lowering", default="inductor")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="rows of the first generate() (2: the probe's bucket)")
    a = ap.parse_args()
    rows = {}
    one(a.arch, a.lowering, False, a.batch)  # warm-up (imports, lazy initialisation), not counted
    for rep in range(a.reps):  # interleaved, so both settings see the same machine load
        for verify in (False, True):
            rows.setdefault(verify, []).append(one(a.arch, a.lowering, verify, a.batch))
    print(f"{a.arch}, lowering={a.lowering}, first generate() with {a.batch} rows x 8 tokens, median of {a.reps}")
    print(f"{'verify':>7} {'parallelize s':>14} {'first generate s':>17} {'total s':>8} {'graphs':>7}")
    for verify, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{str(verify):>7} {med['parallelize']:>14.2f} {med['generate']:>17.2f} {med['total']:>8.2f} {int(med['graphs']):>7}")
    off, on = (statistics.median(r["total"] for r in rows[v]) for v in (False, True))
    print(f"start-up to first tokens, verify on / off: {on / off:.2f}x (+{on - off:.1f} s)")


if __name__ == "__main__":
    main()

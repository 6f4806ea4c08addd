#!/usr/bin/env bash
# The one command to run on a lent machine with one H100/H200: kernel tests on CUDA (the real
# Triton kernels, no interpreter), the attention benchmark (filled-fraction table first, then
# MLA decode, then the S sweep), the launch-parameter sweeps (GQA, MLA), and the decode
# benchmark on CUDA. Under 8 minutes in all: every step has its own `timeout` and is also cut
# to what is left of GPU_CHECK_BUDGET_S; the step limits add up to the budget.
#
#     benchmarks/gpu_check.sh                 # results in $OUT (default ./gpu_out)
#     GPU_CHECK_BUDGET_S=300 benchmarks/gpu_check.sh
#
# Uses the machine's own torch and triton, through python3 (or $PYTHON). Wheels in ./wheels/ (transformers, and pytest /
# hypothesis if the machine lacks them) are installed with --no-deps --no-index first.
# A failing step is reported and the next one still runs; the exit status is nonzero if any
# step failed, timed out or was skipped.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"  # 7m45s: leaves the 8-minute ceiling some slack
START=$(date +%s)
unset TRITON_INTERPRET  # the real kernels, never the interpreter
export CI=true  # derandomized hypothesis: a failure reproduces with the same command
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # cpcompile from this checkout, not installed
PY="${PYTHON:-$(command -v python3 || command -v python)}"

STEPS=()  # "name|status|seconds"
FAILED=0

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_step NAME LIMIT_S CMD...: runs CMD under `timeout`, output to the terminal and $OUT/NAME.log.
run_step() {
    local name=$1 limit=$2 rc=0 t0 status
    shift 2
    local remaining
    remaining=$(left)
    if ((remaining < 15)); then
        STEPS+=("$name|SKIPPED (budget spent)|0")
        FAILED=1
        return 0
    fi
    ((limit > remaining)) && limit=$remaining
    echo
    echo "=== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || rc=$?
    sleep 0.2  # let tee flush
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    STEPS+=("$name|$status|$(($(date +%s) - t0))")
}

# --- 0. environment -----------------------------------------------------------------------
shopt -s nullglob
wheels=(wheels/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
    echo "=== installing ${#wheels[@]} wheel(s) from ./wheels (--no-deps --no-index)"
    "$PY" -m pip install --no-deps --no-index --quiet "${wheels[@]}" || echo "wheel install failed; using what is installed"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/nvidia_smi.txt" || true
HAS_CUDA=0
"$PY" - <<'EOF' 2>&1 | tee "$OUT/environment.txt" && HAS_CUDA=1 || true
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}")
for mod in ("triton", "transformers", "pytest", "hypothesis", "xdist"):
    try:
        print(f"{mod} {getattr(importlib.import_module(mod), '__version__', '?')}")
    except Exception as e:  # report and go on: the steps that need it will fail by name
        print(f"{mod} MISSING ({e!r})")
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"device: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)  # parallel Triton compiles on a 16-core host

if ((HAS_CUDA)); then
    # --- 1. kernel tests on CUDA: kernel_testing.DEVICE is "cuda" when torch sees a GPU -----
    run_step kernel_tests 135 "$PY" -m pytest tests/kernels -q -p no:cacheprovider "${XDIST[@]}" \
        -rfE --durations=10 --junitxml="$OUT/kernel_tests.xml"
    # --- 2. attention benchmark: the filled table first, so a slow sweep cannot lose it -----
    run_step bench_attention_filled 40 "$PY" benchmarks/bench_attention.py --device cuda --table filled \
        --json "$OUT/bench_attention_filled.json"
    # MLA decode (Hq=128, Hkv=1, Dk=576, Dv=512, v a view of k, S=32K, B 1/8/32)
    run_step bench_attention_mla 30 "$PY" benchmarks/bench_attention.py --device cuda --table mla \
        --warmup 5 --iters 20 --json "$OUT/bench_attention_mla.json"
    run_step bench_attention_shapes 60 "$PY" benchmarks/bench_attention.py --device cuda --table shapes \
        --warmup 5 --iters 20 --json "$OUT/bench_attention_shapes.json"
    # --- 3. launch-parameter sweeps: what the heuristic leaves on the table on this device --
    run_step tune_attention 60 "$PY" benchmarks/tune_attention.py --sweep gqa --json "$OUT/tune_attention.json"
    run_step tune_attention_mla 30 "$PY" benchmarks/tune_attention.py --sweep mla --warmup 3 --iters 10 \
        --json "$OUT/tune_attention_mla.json"
    # --- 4. decode benchmark on CUDA (compile-dominated: fewer reps and steps) -------------
    run_step bench_decode 110 "$PY" benchmarks/bench_decode.py --device cuda --reps 2 --steps 16 \
        --json "$OUT/bench_decode.json"
else
    for name in kernel_tests bench_attention_filled bench_attention_mla bench_attention_shapes tune_attention \
        tune_attention_mla bench_decode; do
        STEPS+=("$name|SKIPPED (no CUDA)|0")
    done
    FAILED=1
fi

# --- summary ------------------------------------------------------------------------------
{
    echo
    echo "=== gpu_check summary ($(($(date +%s) - START))s of ${BUDGET_S}s budget; files in $OUT)"
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name status secs <<<"$s"
        printf '  %-24s %-28s %4ss\n' "$name" "$status" "$secs"
    done
    [[ -f "$OUT/kernel_tests.log" ]] && echo "  kernel tests: $(grep -E '(passed|failed|error)' "$OUT/kernel_tests.log" | tail -1)"
    "$PY" - "$OUT" <<'EOF' || true
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
filled = load("bench_attention_filled.json")
if filled:
    for r in filled["filled_rows"]:
        print(f"  filled {r['filled_fraction']:>5.0%} B={r['B']}: {r['ours_s'] * 1e3:.3f} ms, "
              f"{r['fraction_of_copy_bw']:.1%} of copy bw, {r['time_vs_all_slots']:.3f} x t(all S), "
              f"maxdiff vs prefix {r['max_abs_diff_vs_prefix']:.1e}")
mla = load("bench_attention_mla.json")
if mla:
    for r in mla["mla_rows"]:
        print(f"  MLA decode B={r['B']} S={r['S']}: {r['ours_s'] * 1e3:.3f} ms, {r['fraction_of_copy_bw']:.1%} of copy bw "
              f"(KV bytes), separate V {r['separate_v_s'] * 1e3:.3f} ms, rel diff vs fp32 {r['max_rel_diff_vs_fp32']:.1e}")
shapes = load("bench_attention_shapes.json")
if shapes and "worst_fraction" in shapes.get("summary", {}):
    s = shapes["summary"]
    print(f"  S sweep: worst {s['worst_fraction']:.1%} of copy bw for S >= {s['target_min_S']} "
          f"(target {s['target_fraction']:.0%}: {'MET' if s['met'] else 'NOT MET'})")
for label, name, key in (("tune", "tune_attention.json", "results"), ("tune MLA", "tune_attention_mla.json", "mla_results")):
    tune = load(name)
    results = tune.get(key, []) if tune else []
    ok = sorted((r for r in results if "worst_fraction" in r), key=lambda r: -r["worst_fraction"])
    bad = [r["config"] for r in results if "error" in r]
    if ok:
        print(f"  {label}: best {ok[0]['config']} at worst {ok[0]['worst_fraction']:.1%} of copy bw; auto "
              f"{results[0].get('worst_fraction', float('nan')):.1%}; failed configs: {bad or 'none'}")
decode = load("bench_decode.json")
if decode:
    for name, c in decode["contenders"].items():
        print(f"  decode {name}: {c['decode_ms_median']:.2f} ms/step, compile {c['compile_s']:.1f} s")
    print(f"  decode recompiles: {decode['recompiles_during_timed_steps']}, token mismatches: "
          f"{ {k: len(v) for k, v in decode['token_mismatches'].items()} }")
EOF
    ((FAILED)) && echo "  RESULT: FAILED (see the step logs in $OUT)" || echo "  RESULT: all steps ok"
} | tee "$OUT/summary.txt"
exit "$FAILED"

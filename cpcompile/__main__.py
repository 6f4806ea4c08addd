"""`python -m cpcompile explain --model <arch|config.json|model dir> [--tp N --cp N --combine S]`."""

from __future__ import annotations

import argparse
import os
import sys


def _load_model(spec: str):
    import transformers

    from cpcompile.tiny import ARCHITECTURES, tiny_model

    if spec in ARCHITECTURES:
        return tiny_model(spec)
    if os.path.isdir(spec) or spec.endswith(".json"):
        path = spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))
        config = transformers.AutoConfig.from_pretrained(spec if os.path.isdir(spec) else path)
        has_weights = os.path.isdir(spec) and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(spec))
        if has_weights:
            return transformers.AutoModelForCausalLM.from_pretrained(spec).eval()
        return transformers.AutoModelForCausalLM.from_config(config).eval()
    raise SystemExit(
        f"cpcompile: --model {spec!r} is neither a built-in tiny architecture {ARCHITECTURES} nor a local "
        "config.json / model directory (nothing is downloaded)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="print what cpcompile finds in a model and how it would place it")
    ex.add_argument("--model", required=True, help="tiny architecture name, a config.json, or a local HF model directory")
    ex.add_argument("--tp", type=int, default=1)
    ex.add_argument("--cp", type=int, default=1)
    ex.add_argument("--dp", type=int, default=1)
    ex.add_argument("--combine", default="all_to_all", choices=("all_to_all", "ag_rs", "all_gather"))
    ex.add_argument("--kv-interleave", type=int, default=1)
    args = parser.parse_args(argv)

    from cpcompile.explain import explain

    report = explain(
        _load_model(args.model), tp=args.tp, cp=args.cp, dp=args.dp, combine=args.combine, kv_interleave=args.kv_interleave
    )
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""cpcompile's command line.

    python -m cpcompile explain --model <arch|config.json|model dir> [--tp N --cp N --dp N --combine S --ffn F]
    python -m cpcompile generate --model <arch|model dir> --tp N --cp N [--dp N --ffn F --dp-inputs M]
                                 [--max-new-tokens N --batch N --prompt TEXT | --prompt-len N ...]

    F: tp (FFN over the replica's tp*cp ranks) | sp (tokens split over the CP group outside
       attention, FFN over tp) | world_tp (dp > 1: every replica's tokens gathered, FFN over all ranks)
    M: global (every rank passes the same batch, split over the replicas) | local (each replica
       passes its own requests)

`explain` prints what the passes find, the placements, the token layout and the collectives
each layer inserts under that mesh. `generate` starts dp·tp·cp ranks on this machine (torch's
elastic launcher) and runs HF's `generate()` on the parallelized model; see cpcompile/launch.py
and docs/distributed.md.
"""

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
    from cpcompile.options import COMBINES, DP_INPUTS, FFNS, LOWERINGS

    parser = argparse.ArgumentParser(prog="cpcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="print what cpcompile finds in a model and how it would place it")
    ex.add_argument("--model", required=True, help="tiny architecture name, a config.json, or a local HF model directory")
    ex.add_argument("--tp", type=int, default=1)
    ex.add_argument("--cp", type=int, default=1)
    ex.add_argument("--dp", type=int, default=1)
    ex.add_argument("--combine", default="all_to_all", choices=COMBINES)
    ex.add_argument("--ffn", default="tp", choices=FFNS, help="FFN placement (see above)")
    ex.add_argument("--kv-interleave", type=int, default=1)
    gen = sub.add_parser("generate", help="start dp*tp*cp local ranks, parallelize the model, generate, report bytes and time")
    gen.add_argument("--model", default="llama", help="tiny architecture name or a local HF model directory")
    gen.add_argument("--tp", type=int, default=1)
    gen.add_argument("--cp", type=int, default=1)
    gen.add_argument("--dp", type=int, default=1)
    gen.add_argument("--combine", default="all_to_all", choices=COMBINES)
    gen.add_argument("--ffn", default="tp", choices=FFNS, help="FFN placement (see above)")
    gen.add_argument("--dp-inputs", default="global", choices=DP_INPUTS,
                     help="global: one batch split over the replicas; local: replica d passes its own batch+d rows of prompt-len+3d ids")
    gen.add_argument("--kv-interleave", type=int, default=1)
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text (tiny models: its UTF-8 bytes are the token ids)")
    prompt.add_argument("--prompt-len", type=int, help="a prompt of this many seeded random token ids")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--batch", type=int, default=None,
                     help="rows: of the whole batch with --dp-inputs global (default dp), the base of each replica's with local (default 1)")
    gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    gen.add_argument("--lowering", default="inductor", choices=LOWERINGS)
    gen.add_argument("--timeout", type=int, default=600, help="seconds a rank may wait in a collective")
    gen.add_argument("--traceback", action="store_true", help="on failure, also print the lowest failing rank's traceback")
    args = parser.parse_args(argv)

    if args.command == "generate":
        from cpcompile.launch import GenerateSpec, launch

        for name in ("tp", "cp", "dp", "batch", "max_new_tokens", "prompt_len"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                gen.error(f"--{name.replace('_', '-')}={getattr(args, name)}; expected an integer >= 1")
        if args.dp_inputs == "global" and args.batch is not None:
            from cpcompile.data_parallel import split_rows

            try:  # the library's own check, before any rank starts
                split_rows(args.batch, args.dp)
            except ValueError as e:
                gen.error(f"--batch {args.batch} with --dp {args.dp}: {e}")
        return launch(
            GenerateSpec(
                model=args.model, tp=args.tp, cp=args.cp, dp=args.dp, combine=args.combine, ffn=args.ffn,
                dp_inputs=args.dp_inputs, kv_interleave=args.kv_interleave, lowering=args.lowering, prompt=args.prompt,
                prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens, batch=args.batch,
                dtype=args.dtype, timeout_s=args.timeout, show_traceback=args.traceback,
            )
        )

    from cpcompile.explain import explain

    report = explain(
        _load_model(args.model), tp=args.tp, cp=args.cp, dp=args.dp, combine=args.combine, ffn=args.ffn,
        kv_interleave=args.kv_interleave,
    )
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

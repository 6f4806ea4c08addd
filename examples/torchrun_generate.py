"""Generate with a local Hugging Face checkpoint on dp·tp·cp ranks under torchrun.

    torchrun --nproc-per-node 4 examples/torchrun_generate.py --model /path/to/local/hf/dir --tp 2 --cp 2
    torchrun --nproc-per-node 4 examples/torchrun_generate.py --model llama --dp 2 --cp 2 --ffn sp \\
        --prompt "The three most useful data structures are" --prompt "Once upon a time"
    torchrun --nproc-per-node 1 examples/torchrun_generate.py --model llama     # a tiny built-in model

`--model` is a local directory (weights + tokenizer; nothing is downloaded) or a tiny architecture
name from `cpcompile.tiny` (seeded random weights, no tokenizer: token ids are printed).
`cpcompile.parallelize` reads the rank from torch.distributed (it initialises the default group
from torchrun's environment: gloo on CPU, NCCL on CUDA) and shards the model.

With `--dp 1` every rank runs the same prompt and rank 0 prints the result. With `--dp N` the
N replicas serve their own requests (`dp_inputs="local"`): replica d generates from the
d-th `--prompt` (cycling when there are fewer), and the first rank of each replica prints its own.
"""

import argparse
import os

import torch
import transformers

import cpcompile
from cpcompile.tiny import ARCHITECTURES, tiny_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--cp", type=int, default=1)
parser.add_argument("--dp", type=int, default=1)
parser.add_argument("--ffn", default="tp", choices=("tp", "sp", "world_tp"))
parser.add_argument("--prompt", action="append", help="repeat: replica d takes the d-th (default: one English prompt)")
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--lowering", default="inductor", choices=("inductor", "aot_eager", "eager"))
args = parser.parse_args()
prompts = args.prompt or ["The three most useful data structures are"]

device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
if args.model in ARCHITECTURES:
    model, tokenizer = tiny_model(args.model).to(device), None
    encode = lambda text: torch.tensor([list(text.encode())], device=device)  # byte-level: token id = UTF-8 byte (vocab 256)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    encode = lambda text: tokenizer(text, return_tensors="pt").input_ids.to(device)

max_length = max(encode(p).shape[1] for p in prompts) + args.max_new_tokens  # the same on every rank
model = cpcompile.parallelize(
    model, tp=args.tp, cp=args.cp, dp=args.dp, ffn=args.ffn, dp_inputs="local", max_length=max_length, lowering=args.lowering
)
info = model._cpcompile.ctx  # RankContext (None on one rank): this rank's place in the mesh
dp_rank, first = (info.dp_rank, info.tp_rank == info.cp_rank == 0) if info else (0, True)
prompt = prompts[dp_rank % len(prompts)]  # this replica's own request
ids = encode(prompt)
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False)
if first:  # the first rank of each replica
    new = out[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer else f"token ids: {new}"
    print(f"[replica {dp_rank}] {prompt!r} -> {text}" if args.dp > 1 else text)

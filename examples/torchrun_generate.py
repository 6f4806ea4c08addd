"""Generate with a local Hugging Face checkpoint on tp·cp ranks under torchrun.

    torchrun --nproc-per-node 4 examples/torchrun_generate.py --model /path/to/local/hf/dir --tp 2 --cp 2
    torchrun --nproc-per-node 1 examples/torchrun_generate.py --model llama     # a tiny built-in model

`--model` is a local directory (weights + tokenizer; nothing is downloaded) or a tiny architecture
name from `cpcompile.tiny` (seeded random weights, no tokenizer: token ids are printed). Every
rank runs the same script on the same prompt; `cpcompile.parallelize` reads the rank from
torch.distributed (it initialises the default group from torchrun's environment: gloo on CPU,
NCCL on CUDA) and shards the model; rank 0 prints the result.
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
parser.add_argument("--prompt", default="The three most useful data structures are")
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--lowering", default="inductor", choices=("inductor", "aot_eager", "eager"))
args = parser.parse_args()

rank = int(os.environ.get("RANK", 0))
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
if args.model in ARCHITECTURES:
    model, tokenizer = tiny_model(args.model).to(device), None
    ids = torch.tensor([list(args.prompt.encode())], device=device)  # byte-level: token id = UTF-8 byte (vocab 256)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)

max_length = ids.shape[1] + args.max_new_tokens
model = cpcompile.parallelize(model, tp=args.tp, cp=args.cp, max_length=max_length, lowering=args.lowering)
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False)
if rank == 0:
    new = out[0, ids.shape[1]:].tolist()
    print(tokenizer.decode(new, skip_special_tokens=True) if tokenizer else f"token ids: {new}")

"""Sharded loading: every rank reads only its shards of a safetensors checkpoint.

    model = cpcompile.from_pretrained("path/to/model", tp=2, cp=2)      # under torchrun

is the same as

    model = cpcompile.empty_model("path/to/model")      # parameters on `meta`, buffers real
    model = cpcompile.parallelize(model, tp=2, cp=2, checkpoint="path/to/model")

No rank ever holds more than its shards plus what the plan replicates:

  * `empty_model` builds the model from its config with every *parameter* on the meta device
    (no storage) and every buffer real (RoPE's `inv_freq` and other non-persistent buffers are
    computed by the model's own `__init__`, as they are for a loaded model).
  * `parallelize` captures the graph on a meta copy (the graph's structure does not depend on
    weight values) and decides each rank's columns by dependency probing on random values of the
    real shapes (`passes/_probe.py`: probing never reads the weights, so it is exact on a meta
    model for the same reason it is on a loaded one).
  * `Checkpoint.read` then reads this rank's rows or columns of every sharded weight straight
    from the files (`safe_open(...).get_slice`, one contiguous run at a time, so a packed layout
    is an index gather over runs) and every replicated parameter whole, casts each to the dtype
    the model's parameter has, and places it on `device`. A tied parameter is read once.

`Checkpoint.bytes_read` counts every byte read from the files (tests assert it exactly).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cpcompile.passes.shard_weights import WeightShard

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """The checkpoint does not hold what the model's parameters need (names, shapes, files)."""


class Checkpoint:
    """The safetensors files of a local model directory, read tensor by tensor, slice by slice.

    Each read opens its file, copies the slice out and closes it again, so no mapping of a file
    stays resident in a rank's memory and no weight depends on the file once loaded.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint: {self.path} is not a directory (expected a local model directory "
                                  "with config.json and *.safetensors)")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.path.iterdir())[:10]
            raise CheckpointError(
                f"checkpoint: no safetensors weights in {self.path} (found {found}). cpcompile reads each rank's "
                "shards from safetensors files only; convert the checkpoint (model.save_pretrained(path, "
                "safe_serialization=True)) or load it whole and call cpcompile.parallelize(model)."
            )
        from safetensors import safe_open

        self._where: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
        for name in files:
            f = self.path / name
            with safe_open(f, framework="pt") as h:
                for key in h.keys():
                    sl = h.get_slice(key)
                    self._where[key] = (f, tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
        self.bytes_read = 0
        self._key = {k: k for k in self._where}  # the model's parameter name -> the checkpoint's key
        self._converted: dict[str, str] = {}  # model names transformers makes by converting tensors (not slices)

    def for_model(self, model: torch.nn.Module) -> "Checkpoint":
        """Name the checkpoint's tensors by `model`'s parameter names, with the key renamings
        transformers applies when it loads this model (`embed_out` -> `lm_head` in GPT-NeoX, a
        missing or extra base-model prefix). Tensors transformers *converts* while loading
        (per-expert MoE weights merged into one 3-D parameter, permutations) are kept apart:
        slices of them are not slices of the model's parameter, and reading one is refused."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        wanted = model.state_dict()  # meta tensors: names only
        prefix = getattr(model, "base_model_prefix", None)
        self._key, self._converted = {}, {}
        for key in self._where:
            name, converted = rename_source_key(key, renamings, converters, prefix, wanted)
            if name not in wanted and key in wanted:
                name, converted = key, None
            if converted is not None:
                self._converted[name] = key
            else:
                self._key.setdefault(name, key)
        return self

    def __contains__(self, name: str) -> bool:
        return name in self._key

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[self._key[name]][1]

    def converted(self, names) -> list[str]:
        """Those of `names` that exist only as tensors transformers converts while loading."""
        return [n for n in names if n not in self._key and n in self._converted]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (the most common one, by bytes)."""
        by: dict[torch.dtype, int] = {}
        for _, shape, dtype in self._where.values():
            if dtype.is_floating_point:
                by[dtype] = by.get(dtype, 0) + math.prod(shape) * dtype.itemsize
        return max(by, key=by.get) if by else torch.float32

    def read(self, name: str, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`, or only its entries `index` (sorted) along `dim`, as stored (CPU, the file's dtype)."""
        from safetensors import safe_open

        f, shape, _ = self._where[self._key[name]]
        with safe_open(f, framework="pt") as h:
            sl = h.get_slice(self._key[name])
            # safetensors hands out views of its memory map (pages read when first touched, a column
            # slice touching whole rows): copy into memory of our own, one tensor at a time, so what a
            # rank holds is exactly its shard and no weight depends on the file after loading.
            if index is None:
                t = (sl[:] if len(shape) else h.get_tensor(self._key[name])).clone(memory_format=torch.contiguous_format)
            else:
                parts = [sl[(slice(None),) * dim + (slice(a, b),)] for a, b in contiguous_runs(index)]
                t = torch.cat(parts, dim) if len(parts) > 1 else parts[0].clone(memory_format=torch.contiguous_format)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_shard(self, shard: "WeightShard") -> tuple[torch.Tensor, torch.Tensor | None]:
        """A sharded linear's local weight ([out, in] orientation, as `shard_weights.local_tensors`
        gives it) and bias, reading only the rows or columns this rank owns."""
        from cpcompile.passes.shard_weights import pad_rows

        stored = self.shape(shard.weight)
        # column shards own output features, row shards input features; a Conv1D weight is stored [in, out]
        dim = (0 if shard.kind != "row" else 1) ^ int(shard.transposed)
        if len(stored) != 2:
            raise CheckpointError(f"checkpoint: {shard.weight} is stored with shape {stored}; the plan shards it as a "
                                  f"2-D linear weight of shape {shard.full_shape}")
        w = self.read(shard.weight, dim, shard.cols)
        if shard.transposed:
            w = w.t()
        b = None
        if shard.bias is not None:
            b = self.read(shard.bias, 0, shard.cols) if shard.kind != "row" else self.read(shard.bias)
        if shard.kind == "vocab":  # the last ranks' shards are zero padded to the same row count
            return pad_rows(w, shard.local_rows), (pad_rows(b, shard.local_rows) if b is not None else None)
        return w.contiguous(), b


def contiguous_runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted indices as half-open contiguous runs: [0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]."""
    idx = [int(i) for i in index.tolist()]
    if not idx:
        return [(0, 0)]
    runs, start, prev = [], idx[0], idx[0]
    for i in idx[1:]:
        if i != prev + 1:
            runs.append((start, prev + 1))
            start = i
        prev = i
    runs.append((start, prev + 1))
    return runs


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter a module registers goes to the meta device (no storage); buffers stay real.
    The parameter is created by the module first (`torch.empty`, never touched: HF's and torch's
    initialisers are no-ops on meta tensors), so its dtype and shape are the model's own."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(path_or_config, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`AutoModelForCausalLM` of a local model directory (or a config) with its parameters on the
    meta device and its buffers computed: the input `parallelize(..., checkpoint=path)` takes.

    `dtype`: the parameters' dtype; default the checkpoint's (its floating-point tensors' dtype),
    or the config's `dtype` when given a config."""
    import transformers

    if isinstance(path_or_config, transformers.PretrainedConfig):
        config = path_or_config
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
    else:
        config = transformers.AutoConfig.from_pretrained(path_or_config)
        dtype = dtype or Checkpoint(path_or_config).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def meta_parameters(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.is_meta]


def _owners(model: torch.nn.Module) -> dict[int, list[str]]:
    """Parameter identity -> every name it has (tied parameters have several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _set(model: torch.nn.Module, names: list[str], tensor: torch.Tensor) -> None:
    param = torch.nn.Parameter(tensor, requires_grad=False)
    for name in names:
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = param


def check_covers(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Every parameter of `model` is in the checkpoint under one of its names (tied parameters have
    several), with the model's shape; raised before anything is compiled or read."""
    missing, wrong = [], []
    for names in _owners(model).values():
        found = next((n for n in names if n in checkpoint), None)
        if found is None:
            missing.append(names)
            continue
        want = tuple(model.get_parameter(names[0]).shape)
        if tuple(checkpoint.shape(found)) != want:
            wrong.append(f"{found}: checkpoint {tuple(checkpoint.shape(found))}, model {want}")
    converted = checkpoint.converted(n for names in missing for n in names)
    if converted:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} stores {len(converted)} of the model's parameters (first: {converted[:3]}) in a "
            "layout transformers converts while loading (for example per-expert MoE weights merged into one 3-D "
            "parameter); cpcompile reads slices of stored tensors and does not run those conversions in this version. "
            "Load the model whole (AutoModelForCausalLM.from_pretrained) and call cpcompile.parallelize(model)."
        )
    if missing or wrong:
        missing = [" = ".join(names) for names in missing]
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not match the model's parameters: "
            + (f"{len(missing)} missing (first: {missing[:4]})" if missing else "")
            + ("; " if missing and wrong else "")
            + (f"{len(wrong)} of another shape ({wrong[:4]})" if wrong else "")
            + ". cpcompile reads tensors by the model's own parameter names (with the key renamings transformers "
            "applies); load the model whole (AutoModelForCausalLM.from_pretrained) and call cpcompile.parallelize(model)."
        )


def load_replicated(model: torch.nn.Module, checkpoint: Checkpoint, device: torch.device) -> None:
    """Read every parameter still on meta whole from the checkpoint onto `device`, in the dtype the
    model gave it (tied names are read once), and move the buffers to `device`. Call after the
    sharded parameters were replaced, and after `check_covers`."""
    for names in _owners(model).values():
        p = model.get_parameter(names[0])
        if p.is_meta:
            found = next(n for n in names if n in checkpoint)
            _set(model, names, checkpoint.read(found).to(device=device, dtype=p.dtype))
    for owner in model.modules():
        for name, buf in owner._buffers.items():
            if buf is not None and buf.device != device:
                owner._buffers[name] = buf.to(device)


def default_device() -> torch.device:
    """`cuda:LOCAL_RANK` where CUDA is present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None, **parallelize_kwargs):
    """Build the model of `path` empty, then `parallelize(..., checkpoint=path)`: each rank reads
    only its shards. `dtype`: default the checkpoint's; `device`: default `cuda:LOCAL_RANK` where
    CUDA is present, else CPU. Other keywords are `parallelize`'s (tp, cp, dp, combine, ffn, ...)."""
    from cpcompile.parallelize import parallelize

    model = empty_model(path, dtype)
    return parallelize(model, checkpoint=path, device=device, **parallelize_kwargs)

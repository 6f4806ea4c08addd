"""This rank's share of the weights at `parallelize`: `shard_model` decides its shards from the plan
(`passes/shard_weights.py`), keeps its local copies (sliced from the model, or read from a checkpoint's
files) and replaces the model's full parameters by zero-storage stand-ins, so that Dynamo still traces
single-device shapes while the graph reads the local copies; `weight_bytes` counts what a rank holds."""

from __future__ import annotations

import torch

from cpcompile.capture import model_device
from cpcompile.options import Options
from cpcompile.passes import Analysis


def shard_model(model, analysis: Analysis, options: Options, ckpt=None, device=None):
    """This rank's context and weights: decide its weight shards, keep its local copies, and replace the model's full
    parameters for them by zero-storage stand-ins of the full shape (Dynamo then traces the
    single-device shapes; the graph reads the local copies). With `ckpt` the local copies are read
    from the checkpoint's files onto `device` (the model's parameters are on meta)."""
    from cpcompile.distributed import rank_context
    from cpcompile.passes.shard_weights import RankWeights, local_tensors, shard_weights

    device = device if ckpt is not None else model_device(model)
    ctx = rank_context(options, device)
    shards = shard_weights(analysis, ctx)
    params = dict(model.named_parameters())
    local = {}
    for name, shard in shards.items():
        if name not in params:
            raise ValueError(
                f"cpcompile: the plan shards the linear weight {name}, which is not a parameter of the model (it is "
                "computed in the forward); cpcompile can shard only the model's own weights. Run with tp = cp = 1."
            )
        bias_name = shard.bias
        bias = params.get(bias_name) if bias_name else None
        if bias_name and bias is None:
            raise ValueError(
                f"cpcompile: the linear of {name} adds a bias that is not a parameter of the model ({bias_name}); "
                "cpcompile cannot shard it. Run with tp = cp = 1."
            )
        if ckpt is not None:  # presence and shapes were checked up front (loading.check_covers)
            w, b = ckpt.read_shard(shard)
            dtype = params[name].dtype
            local[name] = (w.to(device=device, dtype=dtype), b.to(device=device, dtype=bias.dtype) if b is not None else None)
        else:
            local[name] = local_tensors(shard, params[name].detach(), bias.detach() if bias is not None else None)
        for pname in (name, bias_name if bias is not None else None):
            if pname:
                _stand_in(model, params[pname], device)
    return ctx, RankWeights(shards, local)


def _stand_in(model, full: torch.nn.Parameter, device) -> None:
    """Replace `full` by a zero-storage stand-in of its shape, in every module that holds it (a tied
    embedding and LM head hold one Parameter twice), so no full copy stays referenced."""
    stub = torch.nn.Parameter(torch.empty(1, dtype=full.dtype, device=device).expand(full.shape), requires_grad=False)
    for mod in model.modules():
        for attr, p in list(mod._parameters.items()):
            if p is full:
                mod._parameters[attr] = stub


def weight_bytes(model) -> int:
    """Bytes of weights this rank really holds: the model's parameters (stand-ins count their
    one element) plus the local shards the compiled graph reads."""
    seen, total = set(), 0
    for p in model.parameters():
        st = p.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    state = getattr(model, "_cpcompile", None)
    if state is not None and state.weights is not None:
        for w, b in state.weights.local.values():
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total

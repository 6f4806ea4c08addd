"""Self-verification at `parallelize`: the parallel model must compute what the model did before.

A misread graph must never become a silently wrong model. `parallelize(..., verify=True)` (the
default) therefore checks its own result before returning it:

  1. **Before sharding**, while every rank still holds the whole model, `reference` runs a short
     seeded probe through the unsharded model in eager mode: two rows (the second left-padded,
     as `generate()` pads a batch), a prefill and one greedy decode step, with `position_ids`
     as `generate()` computes them. It keeps the last position's logits of each step and every
     layer's hidden states (`output_hidden_states`).
  2. **After sharding**, `check` runs the same probe through the parallel model (the serving
     engine, so the graphs it compiles are the ones `generate()` uses for such a batch) and
     compares the logits of every row at each step:
     `|parallel - reference| <= atol * max(1, scale / 10) + rtol * |reference|`, where `scale` is
     the row's largest |logit| (the tolerances of `cpcompile.testing.equivalence`, stated for logits
     of O(10), per dtype: fp32 atol 1e-4; bf16 / fp16 atol 0.5, rtol 0.02).
  3. On a mismatch every rank raises `VerificationError` (the decision is all-reduced, so no rank
     goes on alone into a collective). The message names the mesh, the step (prefill or decode),
     the largest error, and **the first layer whose output differs**: the parallel model is run once
     more returning every layer's hidden state (`Engine.diagnose`), compared with the reference's.
     Under ffn='sp' with cp > 1 and ffn='world_tp' with dp > 1 the hidden states are split over
     ranks; the message then says so and names the mesh to re-run on to locate the layer.

What it proves: for this probe, the rewritten graphs (attention over sharded heads and slots, the
sharded projections, the collectives, the cache writes) reproduce the model at a prefill with
left padding and a decode step. What it does not: other batch buckets and chunk sizes compile
their own graphs from the same plan (the test suite covers streams of them); inputs the probe
does not exercise (inputs_embeds, prompts longer than one chunk).

Cost: one eager prefill + decode of the unsharded model, and the parallel model's first prefill
and decode graphs compiled at `parallelize` instead of at the first `generate()` with two rows
and a prompt of at most 16 tokens (docs/verification.md has the measured start-up cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpcompile._hf import cache_arg, forward_parameters, output_cache

PROBE_LENGTHS = (6, 3)  # real tokens of each probe row; the second is left-padded
# Tolerances for logits of O(10), per dtype (cpcompile.testing.equivalence states how they were chosen).
TOLERANCES = {torch.float32: (1e-4, 0.0), torch.float64: (1e-9, 0.0), torch.bfloat16: (0.5, 0.02), torch.float16: (0.5, 0.02)}


class VerificationError(ValueError):
    """The parallel model's outputs differ from the unsharded model's on the verification probe."""


@dataclass
class Probe:
    ids: torch.Tensor  # [B, S] left-padded
    mask: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S], as generate() computes them


@dataclass
class Reference:
    """What the unsharded model computed on the probe."""

    probe: Probe
    logits: list[torch.Tensor]  # per step (prefill, decode): [B, V] fp32, the last position
    hidden: list[tuple[torch.Tensor, ...]]  # per step: every hidden state, [B, T, H] fp32
    tokens: torch.Tensor  # [B] the greedy token fed to the decode step


def probe(model, rows: int = 2) -> Probe:
    """Seeded ids (own generator: the caller's RNG is untouched); row i has PROBE_LENGTHS[i % 2] tokens."""
    cfg = model.config.get_text_config()
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if vocab < 8:
        raise ValueError(f"cpcompile: verification needs the model's vocab_size (found {vocab})")
    gen = torch.Generator().manual_seed(0)
    width = max(PROBE_LENGTHS)
    lengths = [PROBE_LENGTHS[i % len(PROBE_LENGTHS)] for i in range(rows)]
    ids = torch.randint(min(3, vocab - 1), min(vocab, 1000), (rows, width), generator=gen)
    pad = getattr(cfg, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    return Probe(ids.to(device), mask.to(device), pos.to(device))


def _steps(model, p: Probe, tokens: torch.Tensor | None, hidden: bool):
    """Prefill then one decode step (feeding `tokens`, or the prefill's greedy tokens)."""
    takes = forward_parameters(model)
    common = {"use_cache": True}
    if "logits_to_keep" in takes:  # as generate(): the prefill graph generate() compiles for two rows
        common["logits_to_keep"] = 1
    if hidden:
        common["output_hidden_states"] = True
    kw = {"position_ids": p.position_ids} if "position_ids" in takes else {}
    with torch.no_grad():
        out = model(input_ids=p.ids, attention_mask=p.mask, **kw, **common)
        first = out.logits[:, -1].float()
        nxt = first.argmax(-1) if tokens is None else tokens
        mask = torch.cat([p.mask, torch.ones_like(p.mask[:, :1])], dim=1)
        kw = {"position_ids": p.position_ids[:, -1:] + 1} if "position_ids" in takes else {}
        out2 = model(input_ids=nxt[:, None], attention_mask=mask, **kw, **{cache_arg(model): output_cache(out)}, **common)
    logits = [first, out2.logits[:, -1].float()]
    states = [tuple(h.float() for h in o.hidden_states) for o in (out, out2)] if hidden else []
    return logits, states, nxt


def reference(model, rows: int = 2) -> Reference:
    """Run the probe through the unsharded model (call before sharding)."""
    p = probe(model, rows)
    logits, states, tokens = _steps(model, p, None, hidden=True)
    return Reference(p, logits, states, tokens)


def _excess(par: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(error beyond tolerance per row (<= 0: within), absolute error per row), for [B, ...] tensors."""
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    ref, par = ref.flatten(1), par.flatten(1)
    scale = ref.abs().amax(1, keepdim=True).clamp(min=10.0) / 10.0
    err = (par - ref).abs()
    return (err - atol * scale - rtol * ref.abs()).amax(1), err.amax(1)


def _agree_max(x: float, group) -> float:
    """The largest `x` over the ranks (one all-reduce), so that every rank takes the same branch."""
    import torch.distributed as dist

    if group is False or not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, dist.ReduceOp.MAX, group=group)
    return float(t.item())


def check(model, ref: Reference, describe_mesh: str, locate: str | None, group=None) -> dict:
    """Run the probe through the parallel `model` and compare (module docstring). Returns the
    figures (`max_error` per step); raises `VerificationError` on a mismatch.

    `locate`: None if the layer can be located on this mesh, else the advice to print instead.
    `group`: the ranks that decide together (None: the default group; False: single process)."""
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    logits, _, _ = _steps(model, ref.probe, ref.tokens, hidden=False)
    report = {}
    for step, name in enumerate(("prefill", "decode")):
        excess, err = _excess(logits[step].cpu(), ref.logits[step].cpu(), dtype)
        report[name] = float(err.max())
        bad = _agree_max(float(excess.max()), group)
        if bad > 0:
            raise VerificationError(_message(model, ref, step, logits, dtype, describe_mesh, locate))
    return report


def _message(model, ref: Reference, step: int, logits, dtype, describe_mesh: str, locate: str | None) -> str:
    name = ("prefill", "decode")[step]
    excess, err = _excess(logits[step].cpu(), ref.logits[step].cpu(), dtype)
    row = int(err.argmax())
    diff = (logits[step][row].cpu() - ref.logits[step][row].cpu()).abs()
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    lines = [
        f"cpcompile: self-verification failed on {describe_mesh}: at the {name} step the parallel model's logits differ "
        f"from the unsharded model's by up to {float(err.max()):.4g} (probe row {row}"
        f"{', left-padded' if bool((ref.probe.mask[row] == 0).any()) else ''}, vocab index {int(diff.argmax())}; "
        f"tolerance for {str(dtype).replace('torch.', '')}: {atol:g} x max(1, |logits|max / 10) + {rtol:g} x |reference|).",
    ]
    lines.append(locate if locate is not None else _locate(model, ref, step, dtype))
    lines.append(
        "This is a cpcompile error, not yours: the passes misread this model. cpcompile.explain(model, tp=..., cp=...) shows "
        "each layer's roles and placements; please report it with that output. parallelize(..., verify=False) skips this "
        "check (the model would then compute wrong outputs)."
    )
    return "\n".join(lines)


def _locate(model, ref: Reference, step: int, dtype) -> str:
    """The first hidden state (0: the embeddings, i: layer i - 1's output) that differs, at `step`."""
    engine = model._cpcompile.engine
    engine.diagnose = True
    try:
        _, states, _ = _steps(model, ref.probe, ref.tokens, hidden=True)
    finally:
        engine.diagnose = False
    par, want = states[step], ref.hidden[step]
    if len(par) != len(want):
        return f"(the parallel model returned {len(par)} hidden states, the reference {len(want)}; the layer was not located)"
    for i, (p, r) in enumerate(zip(par, want)):
        # the left-padded positions hold values no real token reads; compare real tokens only
        real = ref.probe.mask.bool() if step == 0 else torch.ones(r.shape[:2], dtype=torch.bool)
        p, r = p.cpu()[real], r.cpu()[real]
        excess, err = _excess(p, r, dtype)
        if float(excess.max()) > 0:
            where = "the embeddings (before layer 0)" if i == 0 else f"the output of layer {i - 1}"
            before = "" if i == 0 else f"; everything before it agrees (largest error there {_largest(par, want, i, real):.3g})"
            return f"The first hidden state that differs is {where}: largest error {float(err.max()):.4g}{before}."
    return "Every layer's hidden state agrees within tolerance; the difference arises after the last layer (final norm / LM head)."


def _largest(par, want, upto: int, real) -> float:
    return max(float((p.cpu()[real] - r.cpu()[real]).abs().max()) for p, r in zip(par[:upto], want[:upto]))


# --- A small twin: self-verification when the model's weights are never whole on one rank -----------
#
# `parallelize(..., checkpoint=path)` never holds the whole model, so there is no unsharded model to
# run the probe through. It verifies a *twin* instead: the same architecture (the same config class
# and every field it does not shrink) with fewer layers and narrower widths, seeded random weights in
# fp32, parallelized through the same passes on the same mesh, and checked against its own unsharded
# self as above. The twin keeps what decides the plan: the head counts (Hq, Hkv, hence the head
# groups), the head dims, the layer types present, the MoE expert counts and routing, and the
# divisibility of every sharded width by the FFN group.
#
# What it proves: the passes read this architecture's graph right at this mesh (roles, head layout,
# packing, collectives, cache writes), at the fp32 tolerance. What it does not: that the checkpoint's
# slices are the right ones for the real widths (the sharded reads are tested against the
# eager-loaded shards in tests/test_loading.py), nor behaviour tied to widths it shrank.

TWIN_HIDDEN = 128  # model width of the twin when the config states head_dim (else heads x min(head_dim, 32))
TWIN_VOCAB = 512
TWIN_FFN_PER_RANK = 16  # twin intermediate sizes are this many columns per rank of the largest group


def twin_config(config, world: int):
    """A copy of `config` shrunk as the block above describes."""
    import copy

    cfg = copy.deepcopy(config)
    text = cfg.get_text_config()
    layers = int(text.num_hidden_layers)
    keep = 2
    types = getattr(text, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        keep = max(keep, max(list(types).index(t) for t in set(types)) + 1)  # every layer type occurs
    dense = getattr(text, "first_k_dense_replace", None)
    if isinstance(dense, int):
        keep = max(keep, dense + 1)  # a dense layer and an MoE one
    keep = min(keep, layers)
    text.num_hidden_layers = keep
    if isinstance(types, (list, tuple)) and types:
        text.layer_types = list(types)[:keep]
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    if vocab > TWIN_VOCAB:
        text.vocab_size = TWIN_VOCAB
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(text, key, None)
            if isinstance(v, int) and v >= TWIN_VOCAB:
                setattr(text, key, TWIN_VOCAB - 1 - ("pad_token_id", "bos_token_id", "eos_token_id").index(key))
            elif isinstance(v, list):
                setattr(text, key, [x if x < TWIN_VOCAB else TWIN_VOCAB - 3 for x in v])
    ffn = TWIN_FFN_PER_RANK * world
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        v = getattr(text, key, None)
        if isinstance(v, int) and v > ffn:
            setattr(text, key, ffn)
    hidden = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        head_dim = getattr(text, "head_dim", None)
        if isinstance(head_dim, int) and head_dim > 0:
            new = min(hidden, TWIN_HIDDEN)
        else:
            new = min(hidden, heads * min(hidden // heads, 32))
        text.hidden_size = new
    return cfg


def twin_model(config, world: int, seed: int = 0) -> torch.nn.Module:
    """The twin of `config` (fp32, seeded weights of std 1.6/sqrt(fan_in) so its logits are O(1)-O(10),
    far from ties, as in cpcompile.tiny)."""
    import transformers

    cfg = twin_config(config, world)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 1.6 / p.shape[-1] ** 0.5)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def same_plan(real, twin) -> list[str]:
    """Where the twin's analysis differs from the model's in what decides the plan (per layer the
    twin has: attention head counts, projection roles and placements' kinds); empty if nowhere."""
    out = []
    r_sites, t_sites = {s.index: s for s in real.sites}, {s.index: s for s in twin.sites}
    for i, t in t_sites.items():
        r = r_sites.get(i)
        if r is None:
            out.append(f"layer {i}: attention in the twin only")
            continue
        for k in ("Hq", "Hkv"):
            if r.dims.get(k) != t.dims.get(k):
                out.append(f"layer {i}: {k} {r.dims.get(k)} (model) vs {t.dims.get(k)} (twin)")
        roles_r = sorted(p.role for p in real.roles.by_layer(i))
        roles_t = sorted(p.role for p in twin.roles.by_layer(i))
        if roles_r != roles_t:
            out.append(f"layer {i}: roles {roles_r} (model) vs {roles_t} (twin)")
    if not t_sites and r_sites:
        out.append(f"the twin has no attention site (the model has {len(r_sites)})")
    return out

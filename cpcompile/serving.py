"""Compile once: how a parallelized model serves any request stream with a bounded set of graphs.

`parallelize` compiles the forward with `dynamic=False` (static shapes: CUDA-graph friendly,
no guards that multiply), so every distinct input shape is a graph. Left alone, each new
prompt length and batch size would be one more graph, and Dynamo's recompile limit ends the
process after eight. The engine here sits between `generate()` (or any caller of the
forward) and the compiled graph and maps every call onto a fixed set of shapes:

  * **Batch buckets.** `B` rows run as `bucket(B)` rows, the next of `1, 2, 4, ..., max_batch`
    (per dp replica); the extra rows repeat the last real row and their outputs are dropped.
    A request never needs a mask value cpcompile invents for the dummy rows.
  * **Chunked prefill.** A call with `L > 1` new tokens runs as chunks: `L // C` chunks of
    `C = prefill_chunk` tokens, then one chunk of the smallest size in `16, 32, ..., C` that
    holds the rest. A chunk with `r` real tokens is right-padded to its size; after it ran, the
    cache is rewound by the padding (`KVCache.rewind`: the padded slots get position -1 again
    and the length goes back), so the next call writes where the padding was. Causality hides
    the padding from every real token in the chunk, and the rewind hides it from later ones:
    logits equal the unchunked model's. Prefill activations are bounded by `C` tokens.
  * **Decode** (`L = 1`) is one graph per bucket.

Graphs per model (`graph_bound`): `buckets x input kinds x (1 + chunk sizes x logit modes)`,
where input kinds are input_ids / inputs_embeds and logit modes are 'last token only'
(`generate()`: `logits_to_keep=1`) / 'all tokens'. `generate()` with `input_ids` uses
`buckets x (1 + chunk sizes)` of them. The engine counts the graphs compiled for each shape key
(`Engine.compiles`, one each; the tests assert it) and raises Dynamo's recompile limit to the
bound: past it Dynamo raises (fullgraph), never an eager fallback, which would run un-rewritten
attention over the sharded cache.

Attention DP: in global mode the rows are split as `split_rows` says and every replica pads
its share to the bucket of the largest; in local mode each replica buckets its own rows, and
under `ffn='world_tp'` (where replicas exchange tokens every step) the replicas first agree on
the largest rows and prompt length, so all take the same chunks: a replica with a shorter
prompt runs chunks of padding only, each rewound.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import Cache

from cpcompile._hf import pop_cache
from cpcompile.data_parallel import exchange_layout, split_rows

MIN_CHUNK = 16
LOGIT_MODES = ("last", "all")
INPUT_KINDS = ("input_ids", "inputs_embeds")
# Per-token arguments cut into chunks along their last dim (inputs_embeds: dim 1), padded by
# repeating the last value: padded tokens are rewound, so their values only need to be valid.
TOKEN_ARGS = ("input_ids", "position_ids", "token_type_ids")


def batch_buckets(max_batch: int) -> list[int]:
    """`1, 2, 4, ...` below `max_batch`, then `max_batch` itself."""
    return [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch] + [max_batch]


def chunk_sizes(prefill_chunk: int) -> list[int]:
    """`16, 32, ...` below `prefill_chunk`, then `prefill_chunk` itself."""
    return [MIN_CHUNK << k for k in range(prefill_chunk.bit_length()) if MIN_CHUNK << k < prefill_chunk] + [prefill_chunk]


def chunk_plan(length: int, prefill_chunk: int) -> list[int]:
    """The chunk sizes a call of `length > 1` new tokens runs as."""
    full, rest = divmod(length, prefill_chunk)
    return [prefill_chunk] * full + ([next(c for c in chunk_sizes(prefill_chunk) if c >= rest)] if rest else [])


def graph_bound(max_batch: int, prefill_chunk: int) -> int:
    """The most graphs a parallelized model compiles, whatever the request stream (module docstring)."""
    return len(batch_buckets(max_batch)) * len(INPUT_KINDS) * (1 + len(chunk_sizes(prefill_chunk)) * len(LOGIT_MODES))


def generate_graph_bound(max_batch: int, prefill_chunk: int) -> int:
    """The most graphs `generate()` with input_ids compiles (last-token logits only)."""
    return len(batch_buckets(max_batch)) * (1 + len(chunk_sizes(prefill_chunk)))


def bucket(rows: int, max_batch: int, what: str) -> int:
    if rows > max_batch:
        raise ValueError(
            f"cpcompile: {what} has {rows} rows, more than max_batch={max_batch} the model was parallelized for. "
            f"Pass fewer rows per call or a larger max_batch to cpcompile.parallelize (batch buckets: "
            f"{batch_buckets(max_batch)})."
        )
    return next(b for b in batch_buckets(max_batch) if b >= rows)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """[B, ...] -> [rows, ...], the extra rows repeating the last one (dummy rows of a bucket)."""
    if x.shape[0] == rows:
        return x
    idx = torch.arange(rows, device=x.device).clamp(max=x.shape[0] - 1)
    return x.index_select(0, idx)


def pad_tokens(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Right-pad dim `dim` of `x` to `size`, repeating its last entry (zeros if it has none)."""
    n = x.shape[dim]
    if n == size:
        return x
    if n == 0:
        return x.new_zeros(x.shape[:dim] + (size,) + x.shape[dim + 1 :])
    idx = torch.arange(size, device=x.device).clamp(max=n - 1)
    return x.index_select(dim, idx)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """`x` with the standard row-major strides. Dynamo guards on strides, also of size-1 dims, which
    `contiguous()` leaves as they are (a [1, 32] slice of a [1, 71] tensor keeps stride 71)."""
    return x if x.stride() == torch.empty(x.shape, device="meta").stride() else x.clone(memory_format=torch.contiguous_format)


@dataclass
class Session:
    """One batch of sequences: its KV cache and what the engine knows about it."""

    kv: object  # cpcompile.KVCache with `rows` rows
    rows: int  # rows the graph runs (this replica's, bucketed)
    batch: int  # rows the caller passes
    seen: int = 0  # tokens written per row (padding is rewound, so the caller's count)


@dataclass(frozen=True)
class RowLayout:
    """Which of the caller's rows this rank runs for one forward, and how the graph sees them."""

    rows: int  # rows of this rank's graph (bucketed)
    take: tuple[int, int]  # [start, stop) of the caller's rows this replica runs
    out_rows: tuple[int, ...]  # the caller's rows in the graph's output rows, in order
    replicas: tuple[int, ...] | None  # rows of every replica (the graph's layout marker), or None
    length: int  # tokens to plan chunks for (the longest replica's under local world_tp)


class Engine:
    """The parallelized model's forward: maps any call onto the bounded set of graph shapes."""

    def __init__(self, state, compiled, params: set[str], cache_name: str, device: torch.device, num_layers: int):
        self.state, self.compiled = state, compiled
        self.params, self.cache_name, self.device, self.num_layers = params, cache_name, device, num_layers
        self.sessions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # caller's cache or KVCache -> Session
        self.compiles: dict[tuple, int] = {}  # shape key -> graphs Dynamo compiled for it
        # Set by self-verification (cpcompile/verify.py) to locate a wrong layer: the forward then also
        # returns every layer's hidden states (extra graphs, beyond `graph_bound`; never while serving).
        self.diagnose = False

    # ---- the forward ----------------------------------------------------------------------
    def __call__(self, kwargs: dict):
        st = self.state
        hidden = bool(kwargs.pop("output_hidden_states", False))
        for k, on in (("output_attentions", kwargs.get("output_attentions")), ("output_hidden_states", hidden and not self.diagnose)):
            if on:
                raise ValueError(f"cpcompile: {k}=True is not supported (attention is rewritten and prefill is chunked)")
        if kwargs.pop("return_dict", None) is False:
            raise ValueError("cpcompile: return_dict=False is not supported; the forward returns a ModelOutput")
        # (return_dict=True is the default: dropped, so generate()'s calls and others share graphs)
        past = pop_cache(kwargs)
        kind = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        ref = kwargs.pop(kind, None)
        kwargs.pop("inputs_embeds" if kind == "input_ids" else "input_ids", None)
        if ref is None:
            raise ValueError("cpcompile: the forward needs input_ids or inputs_embeds")
        if kind == "inputs_embeds" and st.weights is not None and any(
                p.role == "embedding" and p.weight in st.weights.shards for p in st.analysis.roles.projections):
            raise ValueError(
                "cpcompile: this model's token embedding is vocab-parallel (each rank holds 1/(tp*cp) of its rows, "
                "and model.get_input_embeddings() is a stand-in), so inputs_embeds cannot be computed outside the "
                "graph; pass input_ids, or parallelize with vocab='replicate'"
            )
        batch, length = ref.shape[0], ref.shape[1]
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise ValueError(
                f"cpcompile: attention_mask must be a 2D [batch, tokens] padding mask (got "
                f"{type(mask).__name__}{'' if not isinstance(mask, torch.Tensor) else list(mask.shape)}); cpcompile builds "
                "the causal masks itself"
            )
        cache_position = kwargs.pop("cache_position", None)  # transformers < 5.24 passes it; the model derives it
        keep = kwargs.pop("logits_to_keep", 0)
        if isinstance(keep, torch.Tensor):
            raise ValueError("cpcompile: logits_to_keep must be an int (the last n tokens' logits; 0 = all)")
        extra = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in TOKEN_ARGS}
        if extra:
            raise ValueError(f"cpcompile: unsupported tensor argument(s) {sorted(extra)}; the forward takes {TOKEN_ARGS}, "
                             "inputs_embeds and a 2D attention_mask")
        if st.ctx is not None:  # before anything rank-dependent: ranks given different inputs must not hang
            known = self.sessions[past] if past is not None and past in self.sessions else None
            st.check_inputs(ref, known.seen if known is not None else 0, keep)
        lay = self._row_layout(batch, length)
        session = self._session(past, lay, batch)
        if session.seen + length > st.max_length:
            raise ValueError(
                f"cpcompile: this step would take the sequence to {session.seen + length} tokens, past max_length="
                f"{st.max_length} the KV cache was allocated for. Nothing was written. Pass a larger max_length to "
                "cpcompile.parallelize (or generate fewer tokens)."
            )
        seen, rows = session.seen, lay.rows
        if cache_position is not None and not torch.equal(cache_position.cpu(), torch.arange(seen, seen + length)):
            raise ValueError(f"cpcompile: cache_position {cache_position.tolist()} is not the next {length} positions "
                             f"after the {seen} in the cache; cpcompile writes each sequence in order")
        take = lambda x: pad_rows(x[lay.take[0] : lay.take[1]] if x.shape[0] == batch else x.expand(batch, *x.shape[1:])[lay.take[0] : lay.take[1]], rows)
        x = take(ref)
        if mask is None:
            mask = torch.ones(batch, seen + length, dtype=torch.long, device=ref.device)
        if mask.shape[1] < seen + length:
            raise ValueError(f"cpcompile: attention_mask has {mask.shape[1]} columns; expected {seen + length} (the "
                             f"{seen} tokens in the cache + the {length} new ones)")
        mask = take(mask[:, : seen + length])  # a mask padded further (to max_length) is cut: causality hides the rest
        tokens = {k: take(v) for k, v in kwargs.items() if k in TOKEN_ARGS and isinstance(v, torch.Tensor)}
        if "position_ids" in self.params and "position_ids" not in tokens:  # as HF: cache position (explicit, so padding stays in range)
            tokens["position_ids"] = torch.arange(seen, seen + length, device=ref.device).expand(rows, length)
        decode = lay.length == 1
        # "last": only the last token's logits (generate()); a model without logits_to_keep returns all
        mode = "last" if decode or (keep == 1 and "logits_to_keep" in self.params) else "all"
        capacity = session.kv.max_length
        parts, last, states = [], None, []
        start = 0
        for size in [1] if decode else chunk_plan(lay.length, st.prefill_chunk):
            real = max(0, min(size, length - start))
            ck = {k: v for k, v in kwargs.items() if k not in TOKEN_ARGS}
            ck[kind] = pad_tokens(x[:, start : start + real], size, 1)
            for k, v in tokens.items():
                ck[k] = pad_tokens(v[..., start : start + real], size, v.dim() - 1)
            m = torch.zeros(rows, capacity, dtype=mask.dtype, device=mask.device)
            m[:, : seen + start + real] = mask[:, : seen + start + real]
            ck["attention_mask"] = m
            if "logits_to_keep" in self.params:
                if decode:
                    ck["logits_to_keep"] = 1
                elif mode == "last":
                    ck["logits_to_keep"] = torch.tensor([max(real, 1) - 1], device=ref.device)
                else:
                    ck["logits_to_keep"] = 0
            ck = {k: _dense(v) if isinstance(v, torch.Tensor) else v for k, v in ck.items()}  # strides are guarded too
            ck[self.cache_name] = session.kv
            ck["use_cache"] = True
            if hidden:
                ck["output_hidden_states"] = True
            layout = None
            if lay.replicas is not None:
                layout = (lay.replicas, tuple(r * size for r in lay.replicas))
            out = self._run(ck, layout, (rows, size, mode, kind, layout) + (("hidden",) if hidden else ()))
            logits = out["logits"]
            if hidden and real:
                states.append([h[:, :real] for h in out["hidden_states"]])
            if mode == "all":
                parts.append(logits[:, :real] if logits.shape[1] == size else logits)
            elif real:
                last = logits
            if size > real:
                session.kv.rewind(size - real)
            start += real
        session.seen += length
        logits = torch.cat(parts, dim=1) if mode == "all" else last
        if mode == "all" and keep > 0:
            logits = logits[:, -keep:]
        rows_out = torch.tensor(lay.out_rows, device=logits.device)
        out["logits"] = logits.index_select(0, rows_out)
        if hidden:  # verification's diagnosis only (`diagnose`): every layer's output, chunks concatenated
            out["hidden_states"] = tuple(torch.cat(h, dim=1).index_select(0, rows_out) for h in zip(*states))
        for name in ("cache", "past_key_values"):
            if name in out:
                out[name] = session.kv
        return out

    def _run(self, kwargs: dict, layout, key: tuple):
        """One call of the compiled graph; counts the graphs each shape key compiled (`compiles`:
        one each, unless `torch._dynamo.reset()` dropped them in between)."""
        backend = self.state.backend
        before = len(backend.reports)
        bound = self.state.graph_bound + (4 if self.diagnose else 0)
        # Dynamo's recompile limit (8 by default) would end the process at the 9th shape; the
        # engine's own bound is the limit instead. fullgraph=True: past it Dynamo raises, never
        # falls back to eager (which would attend over the sharded cache un-rewritten).
        with torch._dynamo.config.patch(recompile_limit=bound, accumulated_recompile_limit=max(bound, 256)):
            try:
                out = self.compiled(replica_layout=layout, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                inner = e.inner_exception
                if not _is_refusal(inner):
                    raise
                # a pass refused this shape's graph: the user gets that message, not Dynamo's wrapper
                inner.add_note(f"cpcompile: raised while compiling the graph of a new step shape {key} "
                               f"(shapes compiled before: {sorted(self.compiles)})")
                raise inner from None
            except (torch._dynamo.exc.TorchRuntimeError, torch._dynamo.exc.Unsupported) as e:
                from cpcompile.capture import CaptureError, first_line, user_frame

                # Dynamo could trace the capture shape but not this one: the model's code depends on
                # the step's shape in a way a static cache does not satisfy (GPT-Neo slices its causal
                # bias by the cache's length, which is shorter than a bucketed prefill chunk).
                raise CaptureError(
                    f"cpcompile: the model's forward could not be traced for the step shape {key} over cpcompile's "
                    f"preallocated KV cache: {type(e).__name__}: {first_line(e)} {user_frame(e)}\n"
                    "The model's code depends on the step's shape in a way cpcompile's static cache does not "
                    "satisfy. Run it without cpcompile."
                ) from e
        self.compiles[key] = self.compiles.get(key, 0) + len(backend.reports) - before
        return out

    @property
    def keys(self) -> set[tuple]:
        """The shape keys run so far: `(rows, tokens, logit mode, input kind, replica layout)`."""
        return set(self.compiles)

    # ---- rows and sessions ------------------------------------------------------------------
    def _row_layout(self, batch: int, length: int) -> RowLayout:
        st, o = self.state, self.state.options
        if o.dp == 1 or (o.dp_inputs == "local" and o.ffn != "world_tp"):
            rows = bucket(batch, st.max_batch, "the batch")
            return RowLayout(rows, (0, batch), tuple(range(batch)), None, length)
        if o.dp_inputs == "global":
            shares = split_rows(batch, o.dp)
            rows = bucket(max(shares), st.max_batch, "a replica's share of the batch")
            d = st.ctx.dp_rank
            start = sum(shares[:d])
            out_rows = tuple(r * rows + i for r, n in enumerate(shares) for i in range(n))
            return RowLayout(rows, (start, start + shares[d]), out_rows, (rows,) * o.dp, length)
        # local requests, FFN over every replica's tokens: agree on rows and chunks first
        every_rows, every_len = exchange_layout(batch, length, st.ctx.handles["dp"])
        rows = bucket(max(every_rows), st.max_batch, "a replica's batch")
        return RowLayout(rows, (0, batch), tuple(range(batch)), (rows,) * o.dp, max(every_len))

    def _session(self, past, lay: RowLayout, batch: int) -> Session:
        from cpcompile.cache import KVCache
        from cpcompile.passes.absorb_latent import latent_layers

        st = self.state
        if past is not None and past in self.sessions:
            s = self.sessions[past]
            if s.batch != batch:
                raise ValueError(f"cpcompile: the KV cache holds {s.batch} rows, this call has {batch}")
            if s.rows != lay.rows:
                raise ValueError(f"cpcompile: the KV cache was allocated for {s.rows} rows per replica, this call needs {lay.rows}")
            return s
        if past is not None and not (isinstance(past, Cache) and not isinstance(past, KVCache) and past.get_seq_length() == 0):
            raise TypeError(
                f"cpcompile: the cache passed is a {type(past).__name__} holding {past.get_seq_length()} tokens that this "
                "model did not create; a model compiled by cpcompile keeps its KV in its own cpcompile.KVCache. Pass none "
                "(generate() makes one) or the cache a previous call returned."
            )
        r = st.ctx
        kv = KVCache(
            self.num_layers,
            st.max_length,  # a last chunk's padding past it goes to the sink slot (cache.py)
            cp=st.options.cp,
            cp_rank=r.cp_rank if r else 0,
            kv_interleave=st.options.kv_interleave,
            tp=st.options.tp,
            tp_rank=r.tp_rank if r else 0,
            latent=latent_layers(st.analysis.sites),  # MLA: one joint latent buffer, slots over tp*cp
        ).allocate_shapes(st.kv_shapes, lay.rows, self.device)
        s = Session(kv, lay.rows, batch)
        self.sessions[kv] = s
        if past is not None:
            self.sessions[past] = s
        return s


def check_serving(prefill_chunk: int, max_batch: int) -> None:
    """parallelize's serving settings, validated up front."""
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"parallelize: prefill_chunk={prefill_chunk!r}; expected a positive number of tokens (default 256)")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"parallelize: max_batch={max_batch!r}; expected a positive number of rows (default 16)")


def _is_refusal(e: BaseException | None) -> bool:
    """cpcompile's own refusals (a pass that cannot rewrite what it found), as opposed to bugs."""
    from cpcompile.passes._probe import ProbeError
    from cpcompile.passes.find_attention import AttentionError
    from cpcompile.passes.plan import MeshError
    from cpcompile.passes.split_tokens import TokenSplitError

    return isinstance(e, (AttentionError, MeshError, TokenSplitError, ProbeError))


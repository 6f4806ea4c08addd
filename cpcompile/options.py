"""cpcompile's settings: one dataclass, one docstring line per field."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

LOWERINGS = ("inductor", "aot_eager", "eager")
COMBINES = ("all_to_all", "ag_rs", "all_gather")
FFNS = ("tp", "sp", "world_tp")
DP_INPUTS = ("global", "local")
VOCABS = ("parallel", "replicate")
MOES = ("tp", "ep")
MLA_UVS = ("after", "before")


@dataclass(frozen=True)
class Options:
    tp: int = 1
    """Tensor-parallel degree: query/KV heads are split over tp ranks."""
    cp: int = 1
    """Decode context-parallel degree: the KV cache's sequence is split over cp ranks."""
    dp: int = 1
    """Attention data-parallel degree: batch rows are split over dp replicas."""
    combine: str = "all_to_all"
    """How CP partial attentions are combined: 'all_to_all' (Helix), 'ag_rs' (vLLM DCP), 'all_gather'."""
    ffn: str = "tp"
    """FFN placement: 'tp' (over the replica's tp*cp ranks), 'sp' (tokens split over the CP group,
    FFN tensor-parallel over tp), 'world_tp' (tokens of all replicas gathered, FFN over all ranks)."""
    dp_inputs: str = "global"
    """With dp > 1: 'global' (every rank passes the same batch; rows are split over the replicas and
    every rank gets the whole batch back) or 'local' (each replica passes its own requests)."""
    vocab: str = "parallel"
    """The token embedding and the LM head: 'parallel' (vocab rows split over the replica's tp*cp ranks:
    a masked local lookup + all-reduce, local logits + all-gather) or 'replicate' (whole on every rank)."""
    moe: str = "tp"
    """MoE experts: 'tp' (each expert's intermediate dim split over the FFN group) or 'ep' (E/n whole
    experts per rank of the FFN group); either way one all-reduce after the routed combine."""
    mla_uv: str = "after"
    """MLA: where W_UV (the latent -> value up-projection) runs relative to the combine: 'after' (on this
    rank's Hq/(tp*cp) heads; the exchange carries kv_lora_rank values per head) or 'before' (on all heads;
    the exchange carries v_head_dim values per head). docs/mla.md weighs the two."""
    kv_interleave: int = 1
    """Runs of this many consecutive tokens go to the same CP rank (DESIGN.md section 2)."""
    lowering: str = "inductor"
    """What compiles the rewritten graph: 'inductor', 'aot_eager' (fast, for tests) or 'eager'."""
    debug_dir: str | None = None
    """If set (or env CPCOMPILE_DEBUG_DIR), each graph is written there before and after each pass."""

    @classmethod
    def from_dict(cls, options: dict | None) -> "Options":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"cpcompile: unknown option(s) {unknown}; expected some of {sorted(known)}")
        opts = cls(**options)
        if opts.debug_dir is None and os.environ.get("CPCOMPILE_DEBUG_DIR"):
            opts = dataclasses.replace(opts, debug_dir=os.environ["CPCOMPILE_DEBUG_DIR"])
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.combine not in COMBINES:
            raise ValueError(f"cpcompile: combine={self.combine!r}; expected one of {COMBINES}")
        if self.ffn not in FFNS:
            raise ValueError(f"cpcompile: ffn={self.ffn!r}; expected one of {FFNS}")
        if self.vocab not in VOCABS:
            raise ValueError(f"cpcompile: vocab={self.vocab!r}; expected one of {VOCABS}")
        if self.moe not in MOES:
            raise ValueError(f"cpcompile: moe={self.moe!r}; expected one of {MOES}")
        if self.mla_uv not in MLA_UVS:
            raise ValueError(f"cpcompile: mla_uv={self.mla_uv!r}; expected one of {MLA_UVS}")
        if self.dp_inputs not in DP_INPUTS:
            raise ValueError(f"cpcompile: dp_inputs={self.dp_inputs!r}; expected one of {DP_INPUTS}")
        if self.lowering not in LOWERINGS:
            raise ValueError(f"cpcompile: lowering={self.lowering!r}; expected one of {LOWERINGS}")
        for name in ("tp", "cp", "dp", "kv_interleave"):
            if getattr(self, name) < 1:
                raise ValueError(f"cpcompile: {name}={getattr(self, name)}; expected an integer >= 1")

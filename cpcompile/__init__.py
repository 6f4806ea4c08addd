"""cpcompile: parallelize an unmodified Hugging Face decoder by compiling it.

Public surface: `parallelize` (and its `VerificationError`), `explain`, the `"cpcompile"` torch.compile backend, and
`KVCache` (the sharded static cache, for driving a compiled forward by hand).
"""

from cpcompile import kernels as _kernels  # noqa: F401  (registers torch.ops.cpcompile.*)
from cpcompile.cache import KVCache
from cpcompile.explain import explain
from cpcompile.loading import empty_model, from_pretrained
from cpcompile.parallelize import parallelize
from cpcompile.verify import VerificationError

__version__ = "0.1.0"
__all__ = ["KVCache", "VerificationError", "empty_model", "explain", "from_pretrained", "parallelize"]

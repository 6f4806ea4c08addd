"""cpcompile: parallelize an unmodified Hugging Face decoder by compiling it."""

from cpcompile import kernels as _kernels  # noqa: F401  (registers torch.ops.cpcompile.*)

__version__ = "0.1.0"

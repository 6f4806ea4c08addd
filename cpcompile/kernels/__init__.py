"""cpcompile kernels: ``torch.ops.cpcompile.attention_with_lse`` and ``torch.ops.cpcompile.merge_states``.

Importing this package registers both ops. See docs/kernels.md.
"""

from cpcompile.kernels import attention as _attention  # noqa: F401  (registers attention_with_lse)
from cpcompile.kernels import merge as _merge  # noqa: F401  (registers merge_states)

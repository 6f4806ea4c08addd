"""Test helpers for cpcompile and for users checking their own model.

  * `assert_equivalent`: a parallelized model against the single-device one, step by step
    (see `cpcompile.testing.equivalence`, `docs/testing.md`);
  * `World`: a persistent multi-process gloo world (see `cpcompile.testing.world`);
  * `cpcompile.testing.strategies`: hypothesis strategies (tiny configs, meshes, prompts);
    imported on demand, so hypothesis is needed only by those who use them.
"""

from cpcompile.testing.equivalence import (
    BF16_TOLERANCE,
    FP32_TOLERANCE,
    TOLERANCES,
    EquivalenceResult,
    NearTie,
    Tolerance,
    assert_equivalent,
)
from cpcompile.testing.world import World, WorldError

__all__ = [
    "BF16_TOLERANCE",
    "FP32_TOLERANCE",
    "TOLERANCES",
    "EquivalenceResult",
    "NearTie",
    "Tolerance",
    "World",
    "WorldError",
    "assert_equivalent",
]

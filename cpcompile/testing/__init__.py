"""Test helpers: `World`, a persistent multi-process gloo world (see `cpcompile.testing.world`)."""

from cpcompile.testing.world import World, WorldError

__all__ = ["World", "WorldError"]

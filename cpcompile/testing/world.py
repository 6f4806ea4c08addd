"""A persistent multi-process gloo world for tests: start `n` ranks once, run functions on all.

    with World(2) as world:
        world.run(check_all_reduce, 3.0)   # -> [rank 0's return value, rank 1's]

Workers are forked from torch.multiprocessing's `forkserver`: a clean process (spawned, never a
fork of the caller) that imports cpcompile, Dynamo and Inductor once per session, so a world of 4
starts in under a second rather than after ~3 CPU-seconds of imports per rank. Each worker uses
one intra-op thread (the ranks share the machine's cores) and joins a gloo process group over
loopback TCP.

`run` pickles `fn` (a module-level function, sent by reference) with its arguments, runs it on
every rank (after `torch._dynamo.reset()`, so runs share no compiled code) and returns the results
in rank order. A rank that raises is reported with its full traceback in one `WorldError`; the
world stays up. A rank that hangs (e.g. in a collective a failed rank never entered) or dies
tears the world down after `timeout_s`; the next `run` starts a fresh one.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as mp


class WorldError(RuntimeError):
    """One or more ranks failed; `tracebacks` maps rank -> the traceback text it reported."""

    def __init__(self, message: str, tracebacks: dict[int, str] | None = None):
        super().__init__(message)
        self.tracebacks = tracebacks or {}


_PRELOAD = ["cpcompile", "torch._dynamo", "torch._inductor.compile_fx", "torch.distributed._functional_collectives"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, n: int, port: int, conn) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    try:
        import torch.distributed as dist
        from torch._inductor import config as inductor_config

        import cpcompile  # noqa: F401  (registers torch.ops.cpcompile.*; preloaded by the fork server)

        inductor_config.compile_threads = 1  # no per-rank pool of compile workers
        dist.init_process_group("gloo", rank=rank, world_size=n, init_method=f"tcp://127.0.0.1:{port}")
        conn.send((True, None))
    except BaseException:
        conn.send((False, traceback.format_exc()))
        return
    while (msg := _recv(conn)) != b"":
        try:
            fn, args, kwargs = pickle.loads(msg)
            torch._dynamo.reset()
            reply = (True, pickle.dumps(fn(*args, **kwargs)))
        except BaseException:
            reply = (False, traceback.format_exc())
        conn.send(reply)
    dist.destroy_process_group()


def _recv(conn) -> bytes:
    try:
        return conn.recv_bytes()
    except EOFError:  # the parent went away
        return b""


class World:
    """`n` gloo ranks in worker processes, started on first use and kept until `close()`."""

    def __init__(self, n: int, start_timeout_s: float = 120.0):
        if n < 1:
            raise ValueError(f"World: n={n}; expected at least one rank")
        self.n, self.start_timeout_s = n, start_timeout_s
        self._procs: list = []
        self._conns: list = []

    def start(self) -> "World":
        if self._procs:
            return self
        ctx, port = mp.get_context("forkserver"), _free_port()
        ctx.set_forkserver_preload(_PRELOAD)  # no-op once the fork server runs
        for rank in range(self.n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, self.n, port, child), daemon=True, name=f"world-rank{rank}")
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self._collect(self.start_timeout_s, what=f"starting a world of {self.n} gloo ranks", fail_fast=True)
        return self

    def run(self, fn, *args, timeout_s: float = 300.0, **kwargs) -> list:
        """Run `fn(*args, **kwargs)` on every rank; returns the per-rank results in rank order."""
        payload = pickle.dumps((fn, args, kwargs))  # fails here, clearly, for a lambda or local function
        self.start()
        for conn in self._conns:
            conn.send_bytes(payload)
        replies = self._collect(timeout_s, what=f"running {getattr(fn, '__qualname__', fn)} on {self.n} ranks")
        return [pickle.loads(r) for r in replies]

    def _collect(self, timeout_s: float, what: str, fail_fast: bool = False) -> list:
        """One reply per rank; a raising rank -> WorldError (world kept), a hang or death -> torn down.

        `fail_fast`: raise at the first failure, not waiting for the others (at start, the other
        ranks would wait in `init_process_group` for the one that failed)."""
        replies: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.n:
            pending = {c: r for r, c in enumerate(self._conns) if r not in replies}
            sentinels = {self._procs[r].sentinel: r for r in pending.values()}
            ready = wait([*pending, *sentinels], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close(graceful=False)
                failed = {r: tb for r, (ok, tb) in sorted(replies.items()) if not ok}
                body = "".join(f"\n--- rank {r} raised ---\n{tb}" for r, tb in failed.items())
                raise WorldError(
                    f"World: timed out after {timeout_s:.0f} s {what}; ranks {sorted(pending.values())} never "
                    "answered (a rank that failed before a collective leaves the others waiting in it). "
                    f"Answered: {sorted(replies)}. The world was torn down; the next run() starts a new one.{body}",
                    failed,
                )
            dead = [r for s, r in sentinels.items() if s in ready]
            for obj in ready:
                if obj in pending:
                    try:
                        replies[pending[obj]] = obj.recv()
                    except EOFError:  # the rank exited without answering
                        dead.append(pending[obj])
            if fail_fast and not all(ok for ok, _ in replies.values()):
                break
            dead = sorted({r for r in dead if r not in replies})
            if dead:
                for r in dead:
                    self._procs[r].join(timeout=5)
                codes = {r: self._procs[r].exitcode for r in dead}
                self.close(graceful=False)
                raise WorldError(f"World: rank(s) {dead} died while {what} (exit codes {codes}); the world was torn down")
        failed = {r: tb for r, (ok, tb) in sorted(replies.items()) if not ok}
        if failed:
            if fail_fast:
                self.close(graceful=False)
            body = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failed.items())
            raise WorldError(f"World: {len(failed)} of {self.n} ranks raised while {what}:\n{body}", failed)
        return [replies[r][1] for r in range(self.n)]

    def close(self, graceful: bool = True) -> None:
        """Stop every rank (asking politely first when `graceful`); safe to call twice."""
        if graceful:
            for conn in self._conns:
                try:
                    conn.send_bytes(b"")
                except OSError:
                    pass  # that rank is already gone; join/kill below handles it
        for proc in self._procs:
            proc.join(timeout=10 if graceful else 0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> "World":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

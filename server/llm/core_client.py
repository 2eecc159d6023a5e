"""How the serving process reaches the engine core: on a thread of its own process
(:class:`ThreadCore`) or in a child process (:class:`ProcessCore`, the default), as vLLM's
V1 ``core_client`` does it over ZMQ.

Both take messages (``("add", CoreRequest)``, ``("abort", key)``) and hand the core's
messages (one per step: ``("step", outputs, decode seconds, counters)``; ``("failed", keys,
message)``; ``("died", why)``) to a callback on the event loop.

The child process (multiprocessing spawn; torch threads: the cores less one) is fed
over two pipes: requests in through a sender thread (a long prompt never blocks the event
loop, and the two sides never wait on each other), one pickled message per step out, read
by the event loop when the pipe is readable. The child ends when it is told to, and also
when the serving process goes away (its pipe reaches EOF), so a server killed with -9
leaves no orphan; its death reaches the caller as ``("died", ...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshserve.protocol.errors import ModelLoadError
from meshserve.server.llm.core import EngineCore, core_threads, run_core

log = logging.getLogger(__name__)

OnMessage = Callable[[tuple[Any, ...]], None]
STOP_TIMEOUT_S = 10.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ThreadCore:
    """The core on one thread of this process (``engine_process: false``)."""

    def __init__(self, path: Path, name: str, parameters: dict[str, Any], extra_eos: tuple[int, ...]) -> None:
        self.core = EngineCore(path, parameters, extra_eos)
        self.name = name
        self._threads = parameters.get("torch_threads")
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def start(self, on_message: OnMessage) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        info = await asyncio.to_thread(self._load)

        def send(msg: tuple[Any, ...]) -> None:
            loop.call_soon_threadsafe(on_message, msg)

        def serve() -> None:
            try:
                run_core(self.core, self._receive, send)
            except BaseException as e:  # a bug, not a model error: say so rather than hang
                log.exception("model %s: the engine core stopped", self.name)
                send(("died", f"{type(e).__name__}: {e}"))

        self._thread = threading.Thread(target=serve, name=f"llm-{self.name}", daemon=True)
        self._thread.start()
        return info

    def _load(self) -> dict[str, Any]:
        import torch

        threads = core_threads(self._threads)
        return self.core.load(threads if self._threads or threads < torch.get_num_threads() else None)

    def _receive(self, block: bool) -> list[tuple[Any, ...]]:
        items = [self._inbox.get()] if block else []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._inbox.get_nowait())
        return items

    def send(self, msg: tuple[Any, ...]) -> None:
        self._inbox.put(msg)

    async def stop(self) -> None:
        if self._thread is not None:  # a step in flight finishes first
            self._inbox.put(("stop",))
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.core.release()

    def size_bytes(self) -> int:
        return self.core.size_bytes()

    @property
    def pid(self) -> int | None:
        return None


class ProcessCore:
    """The core in a child process of its own (``engine_process: true``)."""

    def __init__(self, path: Path, name: str, parameters: dict[str, Any], extra_eos: tuple[int, ...]) -> None:
        self.path, self.name, self.parameters, self.extra_eos = path, name, parameters, extra_eos
        self._proc: Any = None
        self._rx: Any = None  # the child's messages
        self._tx: Any = None  # messages to the child (written by the sender thread only)
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: OnMessage | None = None
        self._ready: asyncio.Future | None = None
        self._closing = False
        self.info: dict[str, Any] = {}

    async def start(self, on_message: OnMessage) -> dict[str, Any]:
        ctx = multiprocessing.get_context("spawn")
        to_child, self._tx = ctx.Pipe(duplex=False)
        self._rx, from_child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=child_main,
            args=(to_child, from_child, str(self.path), self.parameters, self.extra_eos),
            name=f"meshserve-llm-{self.name}",
            daemon=True,  # ended by multiprocessing at a normal exit if nobody stopped it
        )
        await asyncio.to_thread(proc.start)
        self._proc = proc
        to_child.close()  # the child holds these ends: its exit is our EOF
        from_child.close()
        self._loop = loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._ready = loop.create_future()
        self._sender = threading.Thread(target=self._send_loop, name=f"llm-{self.name}-send", daemon=True)
        self._sender.start()
        loop.add_reader(self._rx.fileno(), self._readable)
        try:
            self.info = await self._ready
        except BaseException:
            await self.stop()
            raise
        return self.info

    def send(self, msg: tuple[Any, ...]) -> None:
        self._outbox.put(msg)

    def _send_loop(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self._tx.send(msg)
            except (OSError, ValueError):  # the child is gone: the reader reports it
                return

    def _readable(self) -> None:
        try:
            while self._rx.poll():
                msg = self._rx.recv()
                if msg[0] == "ready":
                    assert self._ready is not None
                    self._ready.set_result(msg[1])
                elif msg[0] == "load_error":
                    assert self._ready is not None
                    self._ready.set_exception(ModelLoadError(msg[1]))
                else:
                    assert self._on_message is not None
                    self._on_message(msg)
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        """The child's pipe closed: it exited or was killed."""
        assert self._loop is not None
        self._loop.remove_reader(self._rx.fileno())
        if self._closing:
            return
        self._proc.join(1.0)
        code = self._proc.exitcode
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        log.error("model %s: the engine process %s died (%s)", self.name, self._proc.pid, why)
        assert self._ready is not None and self._on_message is not None
        if not self._ready.done():
            self._ready.set_exception(ModelLoadError(
                f"the engine process died while loading ({why}; its error is in the server's log). A script"
                " that starts the engine itself needs `if __name__ == '__main__':` around it (the process is"
                " spawned and imports the main module), or set engine_process: false"
            ))  # fmt: skip
        elif not self._ready.cancelled() and self._ready.exception() is None:  # a failed load already said why
            self._on_message(("died", why))

    async def stop(self) -> None:
        """Tell the child to stop (its step in flight finishes first); past the timeout, kill it."""
        if self._closing:
            return
        self._closing = True
        if self._loop is not None and self._rx is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._rx.fileno())
        self._outbox.put(("stop",))
        self._outbox.put(None)
        proc = self._proc
        if proc is not None:
            await asyncio.to_thread(proc.join, STOP_TIMEOUT_S)
            if proc.exitcode is None:
                log.warning("model %s: the engine process did not stop in %ss; killing it", self.name, STOP_TIMEOUT_S)
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        if self._sender is not None:
            await asyncio.to_thread(self._sender.join, 5)
        for conn in (self._rx, self._tx):
            if conn is not None:
                conn.close()

    def size_bytes(self) -> int:
        """The child's resident memory: the model, its KV cache and the framework it runs on."""
        try:
            with open(f"/proc/{self._proc.pid}/statm") as f:
                return int(f.read().split()[1]) * _PAGE
        except (OSError, AttributeError, TypeError):
            return int(self.info.get("size_bytes", 0))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


class ReplicatedCore:
    """Several cores, each a :class:`ProcessCore` with a copy of the model
    (``data_parallel_size``, vLLM's data parallelism): a request goes to the replica with the
    fewest requests in flight and stays there; the front sees one core. Each replica steps
    its own batch on its own cores, so on a CPU the copies use cores one intra-op team
    cannot (a small model's steps are too short to split across threads)."""

    def __init__(self, cores: list[ProcessCore]) -> None:
        self.cores = cores
        self.info: dict[str, Any] = {}
        self._where: dict[int, int] = {}  # request key -> its replica
        self._load = [0] * len(cores)  # requests in flight per replica
        self._counters = [(0, 0, 0)] * len(cores)  # each replica's (prompt tokens, generated tokens, steps)
        self._on_message: OnMessage | None = None
        self._died = False

    async def start(self, on_message: OnMessage) -> dict[str, Any]:
        self._on_message = on_message
        starts = [c.start(lambda msg, i=i: self._from(i, msg)) for i, c in enumerate(self.cores)]
        results = await asyncio.gather(*starts, return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            await self.stop()
            raise failed
        self.info = results[0]
        return self.info

    def send(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "add":
            load = self._load
            i = load.index(min(load))
            self._where[msg[1].key] = i
            load[i] += 1
            self.cores[i].send(msg)
        elif kind == "abort":
            i = self._where.pop(msg[1], None)
            if i is not None:  # else it already finished there
                self._load[i] -= 1
                self.cores[i].send(msg)
        else:
            for core in self.cores:
                core.send(msg)

    def _done(self, key: int) -> None:
        i = self._where.pop(key, None)
        if i is not None:
            self._load[i] -= 1

    def _from(self, i: int, msg: tuple[Any, ...]) -> None:
        """A replica's message, passed on as one core's: counters summed, a death said once."""
        assert self._on_message is not None
        kind = msg[0]
        if kind == "step":
            _, outs, decode_s, counters = msg
            for out in outs:
                if out[2] is not None:  # finished in the replica
                    self._done(out[0])
            self._counters[i] = counters
            msg = ("step", outs, decode_s, tuple(map(sum, zip(*self._counters, strict=True))))
        elif kind == "failed":
            for key in msg[1]:
                self._done(key)
        elif kind == "died":
            if self._died:
                return
            self._died = True  # the front restarts every replica (this object's stop, then a new one)
        self._on_message(msg)

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.cores))

    def size_bytes(self) -> int:
        return sum(c.size_bytes() for c in self.cores)

    @property
    def pid(self) -> int | None:
        return self.cores[0].pid

    @property
    def pids(self) -> list[int | None]:
        return [c.pid for c in self.cores]


def child_main(rx: Any, tx: Any, path: str, parameters: dict[str, Any], extra_eos: tuple[int, ...]) -> None:
    """The engine core process: load, say ready, serve until told to stop or the parent is gone."""
    # Out of the server's process group: Ctrl-C or a SIGTERM to the group (`kill -- -PGID`) reaches
    # the server, which stops us over the pipe, not us first (a core dead of it was restarted, then
    # stopped: seconds more to shut down, and an error logged).
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    core = EngineCore(path, parameters, extra_eos)
    try:
        info = core.load(core_threads(parameters.get("torch_threads")))
    except Exception as e:
        tx.send(("load_error", e.message if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"))
        return
    tx.send(("ready", info))

    def receive(block: bool) -> list[tuple[Any, ...]]:
        items = [rx.recv()] if block else []
        while rx.poll():
            items.append(rx.recv())
        return items

    with contextlib.suppress(EOFError, OSError):  # the serving process went away
        run_core(core, receive, tx.send)

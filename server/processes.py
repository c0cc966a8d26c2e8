"""`--processes N`: N serving processes behind one address, each a whole server (server.py: its own models, batchers,
event loop and GIL) listening on the same port with SO_REUSEPORT, so that the kernel spreads connections among them.

One Python process passes every message through one event loop: receiving, parsing and answering a raw 1080p frame
keeps it busy ~6-7 ms on the 2-core test host whatever the rest of the host could do, so full frames stop there
(docs/server.md#processes). Processes multiply that; a connection (and so every stream on it) stays with the process
that accepted it.

This parent process loads no model and answers no call. It reserves the port, starts the processes (spawned: CUDA
and gRPC do not survive a fork), serves their summed metrics, restarts one that dies after it was listening, on
SIGHUP reads the model folder once for all of them and has each reload it, and on SIGTERM/SIGINT passes the signal on
and waits while each drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from . import logs
from .config import ServerConfig
from .registry import FolderWatch, pin_bundles

log = logging.getLogger("facetwin.server")
POLL_S = 0.2
# A process that keeps dying is a fault restarts cannot mend (a GPU gone, memory short): stop and say so.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
PR_SET_PDEATHSIG = 1  # prctl(2)
STOP_MARGIN_S = 30.0  # past the grace period, for a process to unload its models before it is killed


class ServingProcessError(OSError):
    """A serving process could not start (its message says why); the server stops."""


def run(config: ServerConfig, log_level: str) -> None:
    """Serves with config.processes processes until SIGTERM/SIGINT; a process that cannot start raises
    ServingProcessError."""
    with _reserved(config.address) as address, _metrics_dir(config) as metrics_dir, \
            tempfile.TemporaryDirectory(prefix="facetwin-pins-") as pins_dir:
        _Supervisor(config, address, log_level, metrics_dir, Path(pins_dir) / "pins.json").run()


@contextlib.contextmanager
def _reserved(address: str) -> Iterator[str]:
    """The address with a concrete port, held by a bound socket (SO_REUSEPORT, not listening) while the server runs:
    port 0 becomes one port for every process, and a restarted process finds its port still ours."""
    host, _, port = address.rpartition(":")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    if port.isdigit() and int(port) and _answers(family, host.strip("[]"), int(port)):
        # Another server of this user with SO_REUSEPORT would let us bind, and share its port with us unseen.
        raise OSError(f"could not bind {address}: a server already listens there (set --address)")
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Connections of a server stopped a moment ago linger in TIME_WAIT for a minute; they must not keep its
        # successor from the port (gRPC's own listeners set the same).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except (OSError, ValueError) as exc:
            raise OSError(f"could not bind {address}: {exc} (the port is in use or the address is not this host's; "
                          "set --address)") from None
        yield f"{host}:{sock.getsockname()[1]}"


def _answers(family: socket.AddressFamily, host: str, port: int) -> bool:
    """Whether something accepts connections on the port (a wildcard host is asked on loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            return probe.connect_ex((host, port)) == 0
        except OSError:  # a host name that does not resolve: binding it fails with the reason
            return False


@contextlib.contextmanager
def _metrics_dir(config: ServerConfig) -> Iterator[str]:
    """Where the serving processes write their metrics (prometheus_client's multiprocess mode), when served."""
    if not config.metrics_port:
        yield ""
        return
    with tempfile.TemporaryDirectory(prefix="facetwin-metrics-", ignore_cleanup_errors=True) as path:
        yield path


class _Supervisor:
    def __init__(self, config: ServerConfig, address: str, log_level: str, metrics_dir: str, pins_path: Path) -> None:
        # The parent serves the metrics: the processes only write them (metrics_dir).
        self.child_config = dataclasses.replace(config, address=address, metrics_port=0)
        self.log_level = log_level
        self.config = config
        self.metrics_dir = metrics_dir
        self.context = multiprocessing.get_context("spawn")
        self.events = self.context.Queue()
        self.children: dict[int, multiprocessing.process.BaseProcess] = {}
        self.listening: set[int] = set()
        self.restarts: list[float] = []
        self.stopping = False
        self.reload_wanted = False
        # Every process serves the bundles found now (or at the last reload), which the processes read from this
        # file: one started again later must not serve a bundle added, removed or replaced since under a name its
        # siblings serve differently.
        self.pins_path = pins_path
        self.watch = FolderWatch(Path(config.model_dir)) if config.model_poll_s else None
        self.next_look = time.monotonic() + config.model_poll_s
        self._pin()
        self.generation = 0  # reloads so far
        self.seen_generation: dict[int, int] = {}  # the reloads each process has been asked for

    def _pin(self) -> None:
        pins = pin_bundles(Path(self.config.model_dir))
        partial = self.pins_path.with_suffix(".partial")
        partial.write_text(json.dumps(pins))
        partial.replace(self.pins_path)  # a process reading it sees the old pins or the new, never half

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._want_reload)
        if self.metrics_dir:
            # Read by each process's prometheus_client at import; the spawned processes inherit it.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        metrics_http = None
        log.info("serving on %s with %d processes", self.child_config.address, self.config.processes)
        try:
            for index in range(self.config.processes):
                self._start(index)
            if self.metrics_dir:
                from . import metrics

                metrics_http = metrics.serve_metrics(self.config.metrics_port, self.config.metrics_address,
                                                     self.metrics_dir)
            self._watch()
        finally:
            self._stop_all()
            if metrics_http is not None:
                metrics_http.shutdown()
                metrics_http.server_close()
        log.info("stopped")

    def _stop(self, signum: int, _frame: object) -> None:
        if self.stopping:  # a second signal: passed on, so that every process cuts its drain short
            for child in self.children.values():
                if child.exitcode is None:
                    child.terminate()
        self.stopping = True

    def _want_reload(self, _signum: int, _frame: object) -> None:
        self.reload_wanted = True

    def _reload(self) -> None:
        """Pins what the folder holds now and has each listening process reload; one still starting is asked once it
        listens (it may have read the pins before they changed)."""
        self.reload_wanted = False
        try:
            self._pin()
        except OSError as exc:
            log.error("reload: %s; the serving processes keep serving what they serve", exc)
            return
        self.generation += 1
        log.info("reloading %s in %d serving processes", self.config.model_dir, len(self.children))
        for index in sorted(self.listening):
            self._ask_reload(index)

    def _ask_reload(self, index: int) -> None:
        child = self.children[index]
        self.seen_generation[index] = self.generation
        if child.exitcode is None and child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGHUP)

    def _start(self, index: int) -> None:
        child = self.context.Process(target=_serve_one, name=f"p{index}",
                                     args=(self.child_config, self.log_level, index, self.events, os.getpid(),
                                           str(self.pins_path)))
        child.start()
        self.children[index] = child
        self.seen_generation[index] = self.generation

    def _watch(self) -> None:
        while not self.stopping:
            if self.watch is not None and time.monotonic() >= self.next_look:
                self.next_look = time.monotonic() + self.config.model_poll_s
                self.reload_wanted = self.reload_wanted or self.watch.changed()
            if self.reload_wanted:
                self._reload()
            self._read_events()
            for index, child in list(self.children.items()):
                if child.exitcode is None:
                    continue
                self._forget(child)
                if index not in self.listening:
                    self._read_events()  # its reason, when it sent one before it exited
                    raise ServingProcessError(f"serving process p{index} exited with status {child.exitcode} "
                                              "before it listened (its log says why)")
                self.listening.discard(index)
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(self.restarts) > MAX_RESTARTS:
                    raise ServingProcessError(f"serving processes died {len(self.restarts)} times within "
                                              f"{RESTART_WINDOW_S:.0f} s; stopping")
                log.error("serving process p%d (pid %s) exited with status %s; starting it again; its callers "
                          "reconnect to the others", index, child.pid, child.exitcode)
                self._start(index)
            time.sleep(POLL_S)

    def _read_events(self) -> None:
        while True:
            try:
                index, error = self.events.get_nowait()
            except queue.Empty:
                return
            if error:
                raise ServingProcessError(error)
            self.listening.add(index)
            if self.seen_generation.get(index, 0) < self.generation:
                self._ask_reload(index)
            if len(self.listening) == len(self.children):
                log.info("all %d serving processes listening", len(self.children))

    def _stop_all(self) -> None:
        """SIGTERM to every process (each drains as one server would), then waits; kills what outlives the grace."""
        alive = [c for c in self.children.values() if c.exitcode is None]
        for child in alive:
            child.terminate()
        deadline = time.monotonic() + self.config.grace_s + STOP_MARGIN_S
        for child in alive:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.exitcode is None:
                log.error("serving process %s (pid %s) did not stop in time; killing it", child.name, child.pid)
                child.kill()
                child.join()
            self._forget(child)
        self.events.close()

    def _forget(self, child: multiprocessing.process.BaseProcess) -> None:
        """Drops a dead process's live gauges (calls in flight, streams open, queue depth) from the metrics."""
        if self.metrics_dir and child.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.pid, self.metrics_dir)


def _serve_one(config: ServerConfig, log_level: str, index: int, events: multiprocessing.Queue, parent: int,
               pins_path: str) -> None:
    """One serving process: a whole server, serving the bundles pinned in pins_path (read again at each SIGHUP),
    until SIGTERM."""
    _end_with(parent)
    logs.configure(log_level, config.log_format, server_process=f"p{index}")
    from .server import serve

    def pins() -> dict[str, str]:
        return json.loads(Path(pins_path).read_text())

    try:
        asyncio.run(serve(config, listening=lambda _port: events.put((index, "")), pins=pins))
    except (ValueError, FileNotFoundError, OSError) as exc:
        events.put((index, f"serving process p{index}: {exc}"))
        sys.exit(2)


def _end_with(parent: int) -> None:
    """Asks Linux for SIGTERM when the parent dies, even by SIGKILL, so that no serving process outlives its server
    holding the port and GPU memory; elsewhere the parent's own stop is all there is."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)

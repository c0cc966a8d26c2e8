"""Wires the gRPC server: servicer, health, reflection, message limits, warm-up, graceful drain. Computes nothing."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from facetwin.core import faces
from facetwin.v1 import facetwin_pb2

from . import metrics
from .auth import AuthInterceptor, CertificateScopes, TokenFile, server_credentials
from .config import ServerConfig
from .interceptors import CallInterceptor
from .registry import FolderWatch, ModelRegistry
from .servicer import FaceSwapServicer, add_to_server
from .swap import SwapEngine

log = logging.getLogger("facetwin.server")
SERVICE_NAME = facetwin_pb2.DESCRIPTOR.services_by_name["FaceSwap"].full_name
# The inference threads hold the GIL for a moment before and after each batch (numpy in, numpy out); with Python's
# default 5 ms switch interval they can wait that long behind the event loop, the cores idle. 0.5 ms: served faces/s
# +8 % on the 2-core host (unary, 64 in flight: 443 -> 477 and 419 -> 452; server CPU 1.75 -> 1.81 cores).
GIL_SWITCH_INTERVAL_S = 0.0005
# glibc hands every block over ~128 KiB-32 MiB back to the kernel when it is freed, and every new one then costs a page
# fault per 4 KiB. A raw 1080p frame is 6 MB and each call makes several (the message, its pixels, the answer): on
# the 2-core host, building and serializing one answer took 13 ms this way and 1 ms with freed memory kept.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt(3)
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: only blocks over 32 MiB get their own mapping
TRIM_THRESHOLD_BYTES = 256 << 20  # free memory an arena keeps before it gives some back
MIN_CLIENT_PING_S = 10  # the most often a client may send keepalive pings (gRPC's default: every 5 minutes)


class FaceSwapServer:
    """A running server: `await start()`, then `await wait()`; `await stop()` drains it."""

    def __init__(self, config: ServerConfig, pins: Callable[[], dict[str, str]] | None = None) -> None:
        self.config = config
        # Credentials are read first, before any model loads, so a bad certificate or tokens file fails at once.
        self.credentials = server_credentials(config)
        self.registry = ModelRegistry(config, pins)
        # The call interceptor comes first, so it accounts for the calls the others turn away too.
        self.calls = CallInterceptor(metrics.LabelBound(self.registry))
        interceptors = [self.calls]
        if config.auth_tokens_file:
            interceptors.append(AuthInterceptor(TokenFile(config.auth_tokens_file)))
        self.health = health_aio.HealthServicer()
        limit = config.max_message_mb * 1024 * 1024
        self.grpc_server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Off, so a second server on a taken port fails to bind instead of sharing its calls; on where this is
            # one of several serving processes meant to share the port (processes.py).
            ("grpc.so_reuseport", int(config.processes > 1)),
            *connection_options(config),
        ])
        self.engine = SwapEngine(self.registry)
        scopes = CertificateScopes(config.tls_client_models) if config.tls_client_models else None
        self.servicer = FaceSwapServicer(self.registry, self.engine, config, scopes)
        add_to_server(self.servicer, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        if config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.grpc_server)
        self.port = 0
        self.metrics_http = None
        self._loading: asyncio.Task | None = None
        self._publishing: asyncio.Task | None = None
        self._reloads: set[asyncio.Task] = set()
        self._polling: asyncio.Task | None = None

    def _security(self) -> str:
        transport = "mutual TLS" if self.config.tls_client_ca else "TLS" if self.config.tls_cert else "plaintext"
        auth = "bearer tokens" if self.config.auth_tokens_file else "no authentication"
        return f"{transport}, {auth}"

    async def start(self) -> int:
        """Binds, starts answering (health NOT_SERVING), then loads and warms models in the background."""
        log.info("config %s", json.dumps(self.config.as_dict(), sort_keys=True))
        # Several serving processes: their parent looks at the folder and signals them (processes.py).
        polls = self.config.model_poll_s and self.registry.pins is None
        watch = await asyncio.to_thread(FolderWatch, self.registry.model_dir) if polls else None  # before discover
        names = self.registry.discover()
        log.info("found %d bundle(s) in %s: %s", len(names), self.config.model_dir, names)
        if not names:
            log.warning("no model bundle in %s (sub-folders holding a manifest.json): health stays NOT_SERVING "
                        "(--model-dir)", self.config.model_dir)
        if self.config.processes == 1:  # several processes share the port on purpose (SO_REUSEPORT)
            _check_loopbacks_free(self.config.address)
        try:  # grpcio reports a port it cannot bind as 0 or, in newer releases, as RuntimeError
            if self.credentials is None:
                self.port = self.grpc_server.add_insecure_port(self.config.address)
            else:
                self.port = self.grpc_server.add_secure_port(self.config.address, self.credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"could not bind {self.config.address}: the port is in use or the address is not this "
                          "host's (set --address)")
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.metrics_port:
            try:
                self.metrics_http = metrics.serve_metrics(self.config.metrics_port, self.config.metrics_address)
            except OSError as exc:
                raise OSError(f"could not serve metrics on {self.config.metrics_address}:{self.config.metrics_port}: "
                              f"{exc.strerror or exc} (--metrics-address, --metrics-port)") from None
        if metrics.MULTIPROCESS:
            self._publishing = asyncio.ensure_future(metrics.publish_queue_depth(self.registry.queued))
        else:
            metrics.QUEUE_DEPTH.set_function(self.registry.queued)
        await self.grpc_server.start()
        log.info("listening on port %d (%s; backend %s)", self.port, self._security(), self.registry.backend_cls.name)
        if not (self.config.auth_tokens_file or self.config.tls_client_ca or _loopback(self.config.address)):
            log.warning("%s is reachable from other hosts and asks callers for no credentials: set "
                        "--auth-tokens-file or --tls-client-ca (docs/security.md)", self.config.address)
        why = faces.unavailable_reason(self.config.detector, self.config.landmarks)
        if why is not None:  # found now, not at the first full frame: the detector loads lazily
            log.warning("full frames cannot be swapped by this server (%s): they will be answered UNAVAILABLE; "
                        "aligned faces are served", why)
        self._loading = asyncio.ensure_future(self._load())
        if polls:
            self._polling = asyncio.ensure_future(self._poll_models(watch))
        return self.port

    async def _poll_models(self, watch: FolderWatch) -> None:
        """--model-poll-s: a reload each time the folder looks different."""
        while True:
            await asyncio.sleep(self.config.model_poll_s)
            if await asyncio.to_thread(watch.changed):
                await self.reload()

    async def _load(self) -> None:
        await self.registry.load_all()
        await self._report_health()

    async def _report_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.registry.any_ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        if self.registry.any_ready:
            log.info("models warm; health SERVING")
        else:
            log.warning("no model loaded (see the errors above, or ListModels): health NOT_SERVING")

    async def wait_until_loaded(self) -> None:
        if self._loading is not None:
            await self._loading

    async def reload(self) -> dict[str, str]:
        """Serves what the model folder holds now, without dropping a call (ModelRegistry.reload); {name: what
        happened}."""
        await self.wait_until_loaded()
        if self.servicer.draining.is_set():  # loading models for no caller
            log.info("not reloading: the server is draining")
            return {}
        changes = await self.registry.reload()
        if not self.servicer.draining.is_set():  # a drain says NOT_SERVING and keeps saying it
            await self._report_health()
        return changes

    def request_reload(self) -> None:
        """reload() in the background (SIGHUP); reloads run one after another."""
        task = asyncio.ensure_future(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def wait(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period. Streams
        stop taking frames at once, answer every frame they took, and end with UNAVAILABLE (reconnect)."""
        grace = self.config.grace_s if grace is None else grace
        log.info("draining (grace %.1f s)", grace)
        await self.health.enter_graceful_shutdown()
        self.servicer.draining.set()
        self.calls.cut_off_at = time.perf_counter() + grace
        await self.grpc_server.stop(grace)
        for task in (self._loading, self._publishing, self._polling, *self._reloads):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.metrics_http is not None:
            await asyncio.to_thread(self.metrics_http.shutdown)
            self.metrics_http.server_close()
        await self.registry.close()
        await asyncio.to_thread(self.engine.close)
        log.info("stopped")

    async def stop_now(self) -> None:
        """Cuts a drain short: the calls still in flight end at once (UNAVAILABLE), then stop() finishes."""
        log.warning("stopping at once: the calls still in flight end UNAVAILABLE")
        self.calls.cut_off_at = time.perf_counter()
        await self.grpc_server.stop(0)


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """HTTP/2 connection settings: the connection age (ServerConfig.max_connection_age_s; no grace limit, so the
    calls and streams on an old connection all end as they would have), and keepalive pings from clients down to one
    every MIN_CLIENT_PING_S, with or without calls, so a client that pings to keep a NAT or proxy open, or to find a
    dead connection early, is not sent away for pinging."""
    options = [("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_S * 1000),
               ("grpc.keepalive_permit_without_calls", 1)]
    if config.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)))
    return options


def keep_freed_memory() -> bool:
    """Asks glibc to keep freed memory for reuse (see MMAP_THRESHOLD_BYTES) in one arena per core at most (unless
    MALLOC_ARENA_MAX says otherwise); whether it could (not on other C libraries, where this does nothing).

    glibc gives new threads arenas up to 8 per core, each keeping its own free memory, and a reload of the model folder
    starts new inference threads: under load, 30 reloads of the 64-px demo model on the 2-core host took the server
    from 209 to 394 MB and rising, its memory in use flat; with one arena per core, 210-241 MB, and the same faces/s
    without reloads (bench/soak.py --reload-every, docs/experiments.md)."""
    try:
        libc = ctypes.CDLL(None)
        kept = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        if "MALLOC_ARENA_MAX" not in os.environ:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            kept = kept and bool(libc.mallopt(M_ARENA_MAX, cores))
        return kept
    except (OSError, AttributeError):
        return False


def _check_loopbacks_free(address: str) -> None:
    """localhost:PORT listens on 127.0.0.1 and ::1; gRPC binds whichever is free and only logs that the other was
    taken, and a client that resolves localhost to the taken one reaches another program. OSError, as for a port
    in use, when either is taken."""
    host, _, port = address.rpartition(":")
    if host != "localhost" or not port.isdigit() or int(port) == 0:
        return
    for family, ip in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((ip, int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"could not bind {address}: port {port} is in use on {ip} (localhost is both "
                              "127.0.0.1 and ::1): stop what holds it, or set --address to another port") from None
            # No IPv6 on this host (EAFNOSUPPORT, EADDRNOTAVAIL): gRPC leaves that family out too.


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.") or address.startswith("unix:")


async def serve(config: ServerConfig, listening: Callable[[int], None] | None = None,
                pins: Callable[[], dict[str, str]] | None = None) -> None:
    """Runs until SIGTERM/SIGINT, then drains gracefully; SIGHUP reloads the model folder. `listening(port)` is called
    once the port is bound; pins: see ModelRegistry."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the process is the server's: its threads are ours to schedule
    keep_freed_memory()
    server = FaceSwapServer(config, pins)
    loop = asyncio.get_running_loop()
    # Before start(): a SIGHUP while the models load is served after them, not lost (nor fatal, its default).
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    port = await server.start()
    if listening is not None:
        listening(port)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    draining = asyncio.ensure_future(server.stop())
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second one while draining: the operator wants out now
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop_now()))
    await draining

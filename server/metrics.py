"""Prometheus metrics (served on --metrics-port when set), after Triton's nv_inference_* set.

Labels stay bounded: `method` is one of the service's RPCs, `code` a gRPC status name, `model` and `target` only ever
a loaded bundle and one of its identities, `client` a name the operator gave out (a token's or a certificate's). A
name a caller made up is counted as "unknown", so no caller can grow the number of series; calls that name no model
(ListModels, GetServerInfo) have empty model and target labels.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

if TYPE_CHECKING:
    from .registry import ModelRegistry
    from .swap import SwapOutcome

# Set by processes.py for its serving processes, before they import this module: each then writes its values to
# files in that folder and the parent process serves the sum (prometheus_client's multiprocess mode).
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
QUEUE_DEPTH_EVERY_S = 0.5  # how often a serving process publishes its queue depth in multiprocess mode
UNKNOWN = "unknown"  # the label of a model or target that is not loaded
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_SWAP = ("method", "model", "target")

REQUESTS = Counter("facetwin_requests_total", "Finished calls by gRPC status code (OK and every error)",
                   ["method", "model", "target", "code"])
REQUEST_SECONDS = Histogram("facetwin_request_duration_seconds", "Unary call duration, from the call's arrival to "
                            "its answer (or error)", ["method", "model", "target"], buckets=_LATENCY_BUCKETS)
STREAM_SECONDS = Histogram("facetwin_stream_duration_seconds", "How long streams stayed open", ["method"],
                           buckets=(0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0))
# "livesum": with several serving processes, the sum over those alive.
CALLS_IN_FLIGHT = Gauge("facetwin_calls_in_flight", "Unary calls being served", ["method"], multiprocess_mode="livesum")
STREAMS_OPEN = Gauge("facetwin_streams_open", "Streaming calls open", ["method"], multiprocess_mode="livesum")

SWAPS = Counter("facetwin_swaps_total", "Swapped images (unary calls and stream frames)", _SWAP)
CLIENT_SWAPS = Counter("facetwin_client_swaps_total", "Swapped images by client, for usage accounting: its token's "
                       "NAME or its certificate's common name (empty for callers known only by their address)",
                       ["client", "model", "target"])
SWAP_SECONDS = Histogram("facetwin_swap_seconds", "Server-side time per swapped image, decode to encode", _SWAP,
                         buckets=_LATENCY_BUCKETS)
QUEUE_SECONDS = Histogram("facetwin_queue_seconds", "Time an image waited in the batcher for its batch to start",
                          _SWAP, buckets=_LATENCY_BUCKETS)
INFERENCE_SECONDS = Histogram("facetwin_inference_seconds", "Compute time: the model run of the batch that carried "
                              "the image", _SWAP, buckets=_LATENCY_BUCKETS)
BATCH_SIZE = Histogram("facetwin_batch_size", "Images per model call", ["model", "target"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
STREAM_FRAMES = Counter("facetwin_stream_frames_total", "Stream frames answered, by frame status (OK, DROPPED, "
                        "ERROR) and, for ERROR, the frame's gRPC status code", ["model", "target", "status", "code"])
FRAME_MEMORY_BYTES = Gauge("facetwin_frame_memory_bytes", "Decoded images being worked on, bytes (--frame-memory-mb "
                           "bounds it)", multiprocess_mode="livesum")
FRAME_MEMORY_WAITING = Gauge("facetwin_frame_memory_waiting", "Images waiting for frame memory to be decoded (a busy "
                             "server)", multiprocess_mode="livesum")
MODEL_LOADS = Counter("facetwin_model_loads_total", "Bundles loaded, at start and at each reload of the model "
                      "folder, by result (ready, failed)", ["model", "result"])
# "livemin": with several serving processes, the soonest expiry among those alive.
TLS_CERT_EXPIRY = Gauge("facetwin_tls_certificate_expiry_timestamp_seconds", "When the certificate that new TLS "
                        "connections get expires, Unix time (alert on it minus time() falling below days of "
                        "renewal)", multiprocess_mode="livemin")
QUEUE_DEPTH = Gauge("facetwin_queue_depth", "Requests waiting in the batchers (the autoscaling signal)",
                    multiprocess_mode="livesum")


class LabelBound:
    """Maps the model and target a caller named to metric labels: themselves when loaded, else "unknown"."""

    def __init__(self, registry: "ModelRegistry") -> None:
        self.registry = registry

    def __call__(self, model: str, target: str) -> tuple[str, str]:
        loaded = self.registry.models.get(model)
        if loaded is None:
            return UNKNOWN, UNKNOWN
        return model, target if target in loaded.targets else UNKNOWN


def observe(outcome: "SwapOutcome", method: str, client: str) -> None:
    """One swapped image for `client` (auth.named_client): its total, queue and compute time. Its model and target
    are loaded ones (it was swapped)."""
    origin, timings = outcome.provenance, outcome.timings
    labels = (method, origin.model, origin.target)
    SWAPS.labels(*labels).inc()
    CLIENT_SWAPS.labels(client, origin.model, origin.target).inc()
    SWAP_SECONDS.labels(*labels).observe(timings.total_ms / 1e3)
    if timings.batch_size == 0:  # a full frame without a face to swap ran no model: no queue or compute time
        return
    QUEUE_SECONDS.labels(*labels).observe(timings.queue_ms / 1e3)
    INFERENCE_SECONDS.labels(*labels).observe(timings.inference_ms / 1e3)
    BATCH_SIZE.labels(origin.model, origin.target).observe(timings.batch_size)


async def publish_queue_depth(queued: Callable[[], int]) -> None:
    """Multiprocess mode: the scrape happens in the parent process, which cannot call this process's `queued`, so the
    value is written every QUEUE_DEPTH_EVERY_S instead."""
    while True:
        QUEUE_DEPTH.set(queued())
        await asyncio.sleep(QUEUE_DEPTH_EVERY_S)


def serve_metrics(port: int, address: str = "127.0.0.1", processes_dir: str = "") -> WSGIServer:
    """Starts the /metrics HTTP endpoint on `address` (loopback unless opened on purpose: it has no credentials
    check) in a daemon thread; returns the HTTP server, for `shutdown()`. With `processes_dir` it serves the sum of
    what the serving processes wrote there (multiprocess mode) instead of this process's metrics."""
    registry = REGISTRY
    if processes_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=processes_dir)
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server

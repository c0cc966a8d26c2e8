"""Prometheus metrics (served on --metrics-port when set). Labels stay low-cardinality: method and status code."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

SWAPS = Counter("facetwin_swaps_total", "Swapped images", ["method"])
ERRORS = Counter("facetwin_errors_total", "Failed requests by gRPC status code", ["method", "code"])
LATENCY = Histogram(
    "facetwin_swap_seconds", "Server-side time per swapped image", ["method"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
)
DROPPED = Counter("facetwin_stream_frames_dropped_total", "Stream frames answered DROPPED (latest-frame-wins)")
QUEUE_DEPTH = Gauge("facetwin_queue_depth", "Requests waiting in the batchers (the autoscaling signal)")
BATCH_SIZE = Histogram("facetwin_batch_size", "Images per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128))


def observe(outcome, method: str) -> None:
    SWAPS.labels(method=method).inc()
    LATENCY.labels(method=method).observe(outcome.timings.total_ms / 1e3)
    BATCH_SIZE.observe(outcome.timings.batch_size)


def serve_metrics(port: int, address: str = "127.0.0.1") -> WSGIServer:
    """Starts the /metrics HTTP endpoint on `address` (loopback unless opened on purpose: it has no credentials
    check) in a daemon thread; returns the HTTP server, for `shutdown()`."""
    server, _thread = start_http_server(port, addr=address)
    return server

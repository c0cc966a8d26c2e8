"""Optional OpenTelemetry tracing, with no code path of its own to switch on.

With `facetwin[tracing]` installed and the server started under `opentelemetry-instrument`, the gRPC instrumentation
opens a span for every call (and continues the caller's trace). This module only adds facetwin's fields to that span
and puts the span's ids in the log lines; without OpenTelemetry, or without a span, both do nothing.
"""

from __future__ import annotations

try:
    from opentelemetry import trace
except ImportError:  # not installed: tracing is off
    trace = None


def annotate(**attributes: str) -> None:
    """Sets facetwin.<name> attributes on the current span, when one is being recorded."""
    if trace is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"facetwin.{key}": value for key, value in attributes.items()})


def current_ids() -> dict[str, str]:
    """The current span's trace_id and span_id (hex, as trace back ends show them), or nothing outside a span."""
    if trace is None:
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}

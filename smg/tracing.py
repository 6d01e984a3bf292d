"""OpenTelemetry tracing (--enable-trace, --otlp-traces-endpoint): one
span per proxied request, exported over OTLP in batches by the SDK's
background thread.

The span (kind SERVER, named after the route) carries the route, the
model, the worker that answered, the sends made (retries + 1), the status,
the error code and the time to first byte. The client's W3C
`traceparent` makes it a child of the caller's span; the worker gets a
`traceparent` naming the gateway's span, so its own spans join the trace.
A client's traceparent with the sampled flag off is passed on but not
exported. With tracing off none of this exists: the data plane checks one
attribute per request.

The endpoint is the reference's `<host>:<port>` (OTLP over gRPC, by default
localhost:4317) or an `http://` / `https://` URL (OTLP over HTTP; a URL
without a path gets /v1/traces)."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Optional

log = logging.getLogger("smg.tracing")

_TRACEPARENT = re.compile(rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def exporter_for(endpoint: str):
    """The OTLP exporter for an endpoint: gRPC for host:port, HTTP for a URL."""
    if endpoint.startswith(("http://", "https://")):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        url = endpoint if re.match(r"^https?://[^/]+/.+", endpoint) else endpoint.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=url, timeout=10)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    target = endpoint[len("grpc://"):] if endpoint.startswith("grpc://") else endpoint
    return GrpcExporter(endpoint=target, insecure=True, timeout=10)


class Tracer:
    """Makes the spans of proxied calls (begin at the call's start, end when
    it ends) and queues them for the exporter."""

    def __init__(self, endpoint: str, service_name: str = "smg"):
        from opentelemetry import trace as api
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from smg import __version__

        self.api = api
        self.span_class = ReadableSpan
        self.endpoint = endpoint
        self.processor = BatchSpanProcessor(exporter_for(endpoint), max_queue_size=8192,
                                            schedule_delay_millis=1000, max_export_batch_size=512)
        self.resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self.scope = InstrumentationScope("smg", __version__)
        log.info("Tracing: spans exported over OTLP to %s", endpoint)

    def begin(self, req) -> tuple:
        """A new span for `req`: a child of the client's traceparent (or a new
        trace), which the worker then gets as its parent."""
        m = _TRACEPARENT.match(req.traceparent) if req.traceparent is not None else None
        if m is not None and int(m.group(1), 16) and int(m.group(2), 16):
            trace_id, parent, flags = int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)
        else:
            trace_id, parent, flags = int.from_bytes(os.urandom(16), "big"), 0, 1
        span_id = int.from_bytes(os.urandom(8), "big") or 1
        req.traceparent = b"00-%032x-%016x-%02x" % (trace_id, span_id, flags)
        # the span starts when the request arrived
        return trace_id, span_id, parent, flags, time.time_ns() - int((time.monotonic() - req.start) * 1e9)

    def end(self, trace: tuple, req, model: str, worker: Optional[str], attempts: int, status: int,
            error_code: Optional[str], first_byte_secs: float) -> None:
        api = self.api
        trace_id, span_id, parent, flags, start_ns = trace
        if not flags & 1:
            return  # the caller did not sample this trace
        route = req.path  # proxied routes are exact paths
        attributes = {
            "http.request.method": "POST",
            "http.route": route,
            "http.response.status_code": status,
            "smg.model": model,
            "smg.attempts": attempts,
            "smg.retries": max(0, attempts - 1),
            "smg.request_id": req.request_id.decode("latin-1") if req.request_id else "",
        }
        if worker is not None:
            attributes["smg.worker"] = worker
        if error_code is not None:
            attributes["smg.error_code"] = error_code
        if first_byte_secs >= 0:
            attributes["smg.time_to_first_byte_ms"] = round(first_byte_secs * 1000.0, 3)
        trace_flags = api.TraceFlags(flags)
        span = self.span_class(
            name=f"POST {route}",
            context=api.SpanContext(trace_id, span_id, is_remote=False, trace_flags=trace_flags),
            parent=api.SpanContext(trace_id, parent, is_remote=True, trace_flags=trace_flags) if parent else None,
            resource=self.resource,
            attributes=attributes,
            kind=api.SpanKind.SERVER,
            status=(api.Status(api.StatusCode.ERROR, error_code) if status >= 500 or status == 0
                    else api.Status(api.StatusCode.UNSET)),
            start_time=start_ns,
            end_time=time.time_ns(),
            instrumentation_scope=self.scope,
        )
        self.processor.on_end(span)

    def shutdown(self) -> None:
        """Export what is queued (at most a few seconds), then stop."""
        self.processor.force_flush(5000)
        self.processor.shutdown()

"""--enable-trace: spans exported over OTLP to a real receiver started
here (gRPC, the reference's host:port form, and HTTP)."""

import http.server
import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from helpers import wait_for


class Receiver:
    """Collects the spans of every export request, as {attribute: value} dicts."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for rs in request.resource_spans:
                service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attrs = {}
                        for a in span.attributes:
                            v = a.value
                            attrs[a.key] = (v.string_value if v.HasField("string_value") else
                                            v.int_value if v.HasField("int_value") else
                                            v.double_value if v.HasField("double_value") else v.bool_value)
                        self.spans.append({"name": span.name, "trace_id": span.trace_id.hex(),
                                           "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                           "kind": span.kind, "status": span.status.code, "service": service,
                                           "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                                           **attrs})


@pytest.fixture
def grpc_receiver():
    receiver = Receiver()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            receiver.take(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.endpoint = f"127.0.0.1:{port}"
    yield receiver
    server.stop(0)


@pytest.fixture
def http_receiver():
    receiver = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            receiver.paths = getattr(receiver, "paths", []) + [self.path]
            receiver.take(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield receiver
    server.shutdown()


def test_a_span_per_request_with_the_callers_trace(fake_workers, gateway, grpc_receiver):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--enable-trace", "--otlp-traces-endpoint", grpc_receiver.endpoint,
                 "--policy", "round_robin"], wait_workers=1)
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = g.post("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
               headers={"traceparent": f"00-{caller_trace}-{caller_span}-01", "x-request-id": "traced-1"})
    assert r.status == 200
    # the worker got the gateway's span as its parent, in the caller's trace
    forwarded = w.stats.last_headers["traceparent"]
    assert forwarded.startswith(f"00-{caller_trace}-") and caller_span not in forwarded
    r = g.post("/generate", {"text": "no caller trace"})
    assert r.status == 200
    wait_for(lambda: len(grpc_receiver.spans) >= 2, timeout=10, message="two spans exported")
    chat = next(s for s in grpc_receiver.spans if s["http.route"] == "/v1/chat/completions")
    assert chat["trace_id"] == caller_trace and chat["parent"] == caller_span
    assert chat["span_id"] == forwarded.split("-")[2]
    assert chat["service"] == "smg" and chat["name"] == "POST /v1/chat/completions" and chat["kind"] == 2  # SERVER
    assert chat["http.response.status_code"] == 200 and chat["smg.model"] == "fake-model"
    assert chat["smg.worker"] == w.url and chat["smg.retries"] == 0 and chat["smg.request_id"] == "traced-1"
    assert 0 < chat["smg.time_to_first_byte_ms"] < 10_000 and chat["end"] >= chat["start"]
    generate = next(s for s in grpc_receiver.spans if s["http.route"] == "/generate")
    assert generate["parent"] == "" and generate["trace_id"] != caller_trace  # a trace of its own


def test_failures_retries_and_unsampled_traces(fake_workers, gateway, http_receiver):
    (w,) = fake_workers(1, fail_status=503, fail_count=1)
    g = gateway(["--worker-urls", w.url, "--enable-trace", "--otlp-traces-endpoint", http_receiver.endpoint,
                 "--retry-initial-backoff-ms", "1", "--disable-circuit-breaker"], wait_workers=1)
    assert g.post("/generate", {"text": "retried once"}).status == 200
    wait_for(lambda: http_receiver.spans, timeout=10, message="a span over OTLP/HTTP")
    assert http_receiver.paths[0] == "/v1/traces"
    span = http_receiver.spans[0]
    assert span["smg.attempts"] == 2 and span["smg.retries"] == 1 and span["http.response.status_code"] == 200
    w.set(fail_status=500, fail_count=-1)
    assert g.post("/generate", {"text": "fails"}, headers={"x-request-id": "failing"}).status == 500
    wait_for(lambda: any(s["smg.request_id"] == "failing" for s in http_receiver.spans), timeout=10,
             message="the failed request's span")
    failed = next(s for s in http_receiver.spans if s["smg.request_id"] == "failing")
    assert failed["status"] == 2 and failed["http.response.status_code"] == 500  # STATUS_CODE_ERROR
    # a caller that does not sample: the context is passed on, nothing is exported
    w.set(fail_status=0)
    before = len(http_receiver.spans)
    unsampled = "00-11111111111111111111111111111111-2222222222222222-00"
    assert g.post("/generate", {"text": "x"}, headers={"traceparent": unsampled,
                                                        "x-request-id": "unsampled"}).status == 200
    assert w.stats.last_headers["traceparent"].startswith("00-11111111111111111111111111111111-")
    assert w.stats.last_headers["traceparent"].endswith("-00")
    assert g.post("/generate", {"text": "y"}, headers={"x-request-id": "after"}).status == 200
    wait_for(lambda: any(s["smg.request_id"] == "after" for s in http_receiver.spans), timeout=10,
             message="a later span")
    assert not any(s["smg.request_id"] == "unsampled" for s in http_receiver.spans[before:])


def test_without_tracing_the_callers_traceparent_passes_unchanged(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert g.post("/generate", {"text": "x"}, headers={"traceparent": tp}).status == 200
    assert w.stats.last_headers["traceparent"] == tp


def test_tracing_without_the_sdk_says_what_to_install():
    import subprocess
    import sys

    code = ("import sys\n"
            "class Missing:\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.startswith('opentelemetry'):\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Missing())\n"
            "from smg.cli import main\n"
            "main(['--enable-trace'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--enable-trace needs the OpenTelemetry SDK and exporters: pip install 'smg[tracing]'" in out.stderr

"""A fake SGLang-compatible worker, for tests, benchmarks and trying smg without a GPU.

    python -m smg.testing --port 8001              # one worker
    python -m smg.testing --port 8001 --count 4    # workers on 8001..8004

It answers the worker API the gateway uses (`/health`, `/model_info`,
`/get_model_info`, `/server_info`, `/get_server_info`, `/v1/models`,
`/v1/loads`, `/flush_cache`, `/health_generate`) and the generation routes
(`/generate`, `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/rerank`, `/rerank`, `/v1/classify`), streaming SSE when asked to.
Every response says which worker produced it (`meta_info.worker` or a
top-level `worker`), and bootstrap fields of PD requests are echoed back.

Behaviour can be changed while it runs, in-process through
`FakeWorker.config` or over HTTP with `POST /_fake/config {"healthy": false}`;
`GET /_fake/stats` reports what it has seen.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import socket
import threading
import time
from typing import Any

import httptools
import orjson

GENERATION_PATHS = frozenset(
    [
        "/generate",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/rerank",
        "/v1/responses",
        "/v1/classify",
        "/v1/messages",
        "/v1/messages/count_tokens",
    ]
)


@dataclasses.dataclass
class FakeWorkerConfig:
    """Knobs that tests flip at run time. Every field can be set over HTTP too."""

    model_id: str = "fake-model"
    # close a kept-alive connection instead of answering its next request, as a
    # server does when its keep-alive timeout races a request
    close_reused: bool = False
    # "regular", "prefill" or "decode": reported as server_info.disaggregation_mode
    role: str = "regular"
    healthy: bool = True
    # seconds /health waits before answering (to test health-check timeouts)
    health_delay: float = 0.0
    # 404 here makes the gateway fall back to /get_model_info
    model_info_status: int = 200
    server_info_status: int = 200
    # when non-zero, generation routes answer with this status ...
    fail_status: int = 0
    # ... for this many requests (-1: until fail_status is reset)
    fail_count: int = -1
    # the failure's body is chunked and never ends (a worker stuck mid-answer)
    fail_endless: bool = False
    # False: answer generation requests without parsing their bodies (a
    # worker that costs a load test next to nothing; no streaming, no echo)
    parse_bodies: bool = True
    # "normal"; "reset" closes the connection on a generation request; "stall"
    # never answers it; "garbage" answers bytes that are not HTTP
    mode: str = "normal"
    # seconds before the response (or, streaming, before the first event)
    response_delay: float = 0.0
    stream_chunks: int = 4
    stream_interval: float = 0.0
    # streaming: close the connection after sending this many events (-1: never)
    drop_after_chunks: int = -1
    # tokens per non-streamed completion
    completion_tokens: int = 8
    # the worker requires this bearer token on generation routes
    api_key: str | None = None
    dp_size: int = 1
    tp_size: int = 1
    # --simulate: generation runs on a model of an engine (prefix KV cache,
    # serial prefill, batched decode; smg.simulated_engine) instead of at once
    simulate: bool = False
    sim_cache_chars: int = 1 << 20
    sim_prefill_chars_per_sec: float = 200_000.0
    sim_max_running: int = 32
    sim_decode_step: float = 0.008
    # token blocks instead of character blocks: the model's tokenizer.json,
    # blocks of sim_block_tokens; with sim_kv_events_port the engine publishes
    # its KV-cache events there (and answers replays on sim_kv_replay_port)
    sim_tokenizer: str | None = None
    sim_block_tokens: int = 16
    sim_kv_events_port: int = 0
    sim_kv_replay_port: int = 0
    version: str = "0.0.0-fake"
    # "sglang" or "vllm" (vLLM answers /v1/models with owned_by "vllm")
    engine: str = "sglang"


@dataclasses.dataclass
class FakeWorkerStats:
    requests: dict[str, int] = dataclasses.field(default_factory=dict)
    generation_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    # generation requests whose client went away before the response ended
    disconnects: int = 0
    completed: int = 0
    health_checks: int = 0
    # bootstrap fields of PD requests, in arrival order
    bootstrap: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    last_body: bytes = b""
    connections: int = 0
    # time.monotonic() of the last generation request (benchmarks: when traffic stopped)
    last_request_at: float = 0.0
    # requests per prompt tag: a /generate text starting "[tag] " counts under "tag"
    # (the load benchmark measures prefix affinity with it)
    tags: dict[str, int] = dataclasses.field(default_factory=dict)
    # request heads and body bytes received, counted as they arrive (a
    # streamed request body shows here before the request is complete)
    heads: int = 0
    body_bytes: int = 0
    # requests per data_parallel_rank named in the body (the gateway's --dp-aware)
    dp_ranks: dict[int, int] = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["last_body"] = self.last_body.decode("utf-8", "replace")
        d["dp_ranks"] = {str(k): v for k, v in self.dp_ranks.items()}
        return d


class _Request:
    __slots__ = ("method", "path", "headers", "body", "_json")

    def __init__(self) -> None:
        self.method = ""
        self.path = ""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self._json: Any = _UNPARSED

    def json(self) -> Any:
        """The body as JSON, parsed once (raises orjson.JSONDecodeError)."""
        if self._json is _UNPARSED:
            self._json = orjson.loads(self.body) if self.body else {}
        return self._json


_UNPARSED = object()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _head(status: int, content_type: str, length: int | None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"content-type: {content_type}"]
    if length is None:
        lines.append("transfer-encoding: chunked")
    else:
        lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _WorkerProtocol(asyncio.Protocol):
    """One client connection to the fake worker (usually the gateway's pool)."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req = _Request()
        self.header_name = ""
        self.queue: list[_Request] = []
        self.busy = False
        self.closed = False
        self.served = 0
        self.active_task: asyncio.Task | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.worker.stats.connections += 1
        self.worker._conns.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(_head(400, "text/plain", 11) + b"bad request")
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.worker._conns.discard(self)
        if self.active_task is not None:
            self.active_task.cancel()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.req = _Request()

    def on_headers_complete(self) -> None:
        self.req.method = self.parser.get_method().decode()
        self.worker.stats.heads += 1


    def on_url(self, url: bytes) -> None:
        self.req.path += url.decode()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.req.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.req.body += body
        self.worker.stats.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.req.path = self.req.path.split("?", 1)[0]
        self.queue.append(self.req)
        if not self.busy:
            self._next()

    # request handling
    def _next(self) -> None:
        if self.closed or not self.queue:
            self.busy = False
            return
        self.busy = True
        req = self.queue.pop(0)
        self.served += 1
        if self.served > 1 and self.worker.config.close_reused and req.path in GENERATION_PATHS:
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.worker.handle_fast(self, req):
            self._next()
            return
        self.active_task = asyncio.get_running_loop().create_task(self._handle_slow(req))

    async def _handle_slow(self, req: _Request) -> None:
        try:
            await self.worker.handle(self, req)
        except asyncio.CancelledError:
            pass
        self.active_task = None
        if not self.closed:
            self._next()

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)


class FakeWorker:
    """An SGLang-like worker on (host, port). Use `start()` / `stop()` to run it
    in a background thread, or `await serve()` inside a running loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, name: str | None = None,
                 ssl_context: Any = None, **config: Any):
        """ssl_context: serve HTTPS with it (an ssl.SSLContext), e.g. one
        that requires client certificates (mTLS)."""
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.config = FakeWorkerConfig(**config)
        self.stats = FakeWorkerStats()
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._conns: set[_WorkerProtocol] = set()
        self._rid = 0
        self._engine = None
        self._chat_template = None      # --sim-tokenizer's model's chat template, if it ships one
        # /v1/responses answers kept for GET/DELETE /v1/responses/{id}, as an
        # engine does for requests with `store` (the default); the oldest go first
        self.stored: dict[str, tuple[dict, Any]] = {}

    @property
    def name(self) -> str:
        return self._name or f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_context is not None else 'http'}://{host}:{self.port}"

    # lifecycle
    async def serve(self) -> None:
        """Serve until `stop()`; binds first so `port=0` gets a real port."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        if self.config.simulate and self.config.sim_kv_events_port:
            self.engine         # its event publisher listens from the start, as an engine's does
        self._server = await self._loop.create_server(lambda: _WorkerProtocol(self), sock=sock, backlog=4096,
                                                      ssl=self.ssl_context)
        await self._stopped.wait()
        self._server.close()
        if self._engine is not None and self._engine.events is not None:
            self._engine.events.close()
        # a stopped worker is gone: its open connections die with it
        for proto in list(self._conns):
            if proto.transport is not None:
                proto.transport.abort()
        await asyncio.sleep(0)

    def start(self) -> FakeWorker:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            import uvloop

            async def main() -> None:
                task = asyncio.ensure_future(self.serve())
                while self._server is None and not task.done():
                    await asyncio.sleep(0.001)
                ready.set()
                await task

            try:
                uvloop.run(main())
            except BaseException as e:  # surfaced to the caller of start()
                errors.append(e)
                ready.set()

        self._thread = threading.Thread(target=run, name=f"fake-worker-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        """Stop serving and drop every open connection (idempotent)."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def set(self, **changes: Any) -> None:
        """Change config fields (thread-safe enough: single attribute writes)."""
        for key, value in changes.items():
            if not hasattr(self.config, key):
                raise AttributeError(f"unknown fake worker setting {key!r}")
            setattr(self.config, key, value)

    def reset_stats(self) -> None:
        self.stats = FakeWorkerStats()
        if self._engine is not None:
            self._engine.reset_stats()

    @property
    def engine(self):
        """The simulated engine (--simulate), made on first use."""
        if self._engine is None:
            from smg.simulated_engine import EngineModel, KvEventPublisher, SimulatedEngine, TokenBlocks

            cfg = self.config
            blocks = events = None
            if cfg.sim_tokenizer:
                from smg.tokenizer import load_tokenizer

                from smg.tokenizer import load_chat_template

                blocks = TokenBlocks(load_tokenizer(cfg.sim_tokenizer), cfg.sim_block_tokens, seed=self.port)
                self._chat_template = load_chat_template(cfg.sim_tokenizer)
                if cfg.sim_kv_events_port:
                    events = KvEventPublisher(cfg.sim_kv_events_port, cfg.sim_kv_replay_port, self.host)
            self._engine = SimulatedEngine(EngineModel(
                cache_chars=cfg.sim_cache_chars, prefill_chars_per_sec=cfg.sim_prefill_chars_per_sec,
                max_running=cfg.sim_max_running, decode_step=cfg.sim_decode_step), blocks, events)
        return self._engine

    # handlers
    def _count(self, path: str) -> None:
        self.stats.requests[path] = self.stats.requests.get(path, 0) + 1

    def _json(self, proto: _WorkerProtocol, status: int, obj: Any) -> None:
        body = orjson.dumps(obj)
        proto._write(_head(status, "application/json", len(body)) + body)

    def handle_fast(self, proto: _WorkerProtocol, req: _Request) -> bool:
        """Answer what needs no waiting at once; False hands it to `handle`."""
        cfg = self.config
        path = req.path
        self._count(path)
        if path in GENERATION_PATHS:
            if cfg.mode != "normal" or cfg.response_delay > 0 or cfg.simulate:
                return False
            return self._generate(proto, req, streaming_allowed=False)
        if path == "/health":
            self.stats.health_checks += 1
            if cfg.health_delay > 0:
                return False
            if cfg.healthy:
                proto._write(_head(200, "text/plain", 0))
            else:
                self._json(proto, 503, {"error": "unhealthy"})
            return True
        if path in ("/model_info", "/get_model_info"):
            if path == "/model_info" and cfg.model_info_status != 200:
                self._json(proto, cfg.model_info_status, {"error": "model_info unavailable"})
                return True
            self._json(
                proto,
                200,
                {
                    "model_path": cfg.model_id,
                    "tokenizer_path": cfg.model_id,
                    "is_generation": True,
                    "has_image_understanding": False,
                    "model_type": "fake",
                    "architectures": ["FakeForCausalLM"],
                    "served_model_name": cfg.model_id,
                },
            )
            return True
        if path in ("/server_info", "/get_server_info"):
            if path == "/server_info" and cfg.server_info_status != 200:
                self._json(proto, cfg.server_info_status, {"error": "server_info unavailable"})
                return True
            mode = "null" if cfg.role == "regular" else cfg.role
            self._json(
                proto,
                200,
                {
                    "model_path": cfg.model_id,
                    "served_model_name": cfg.model_id,
                    "tp_size": cfg.tp_size,
                    "dp_size": cfg.dp_size,
                    "disaggregation_mode": mode,
                    "max_running_requests": 256,
                    "version": cfg.version,
                    "worker": self.name,
                },
            )
            return True
        if path == "/v1/models":
            owner = "vllm" if cfg.engine == "vllm" else "sglang"
            self._json(
                proto,
                200,
                {
                    "object": "list",
                    "data": [{"id": cfg.model_id, "object": "model", "created": 0, "owned_by": owner, "root": cfg.model_id}],
                },
            )
            return True
        if path == "/v1/loads":
            self._json(
                proto,
                200,
                {
                    "timestamp": time.time(),
                    "version": cfg.version,
                    "dp_rank_count": cfg.dp_size,
                    "loads": [
                        {"dp_rank": r, "num_running_reqs": self.stats.in_flight, "num_waiting_reqs": 0, "worker": self.name}
                        for r in range(cfg.dp_size)
                    ],
                },
            )
            return True
        if path == "/metrics":
            body = (f'# HELP sglang:num_running_reqs The number of running requests.\n'
                    f'# TYPE sglang:num_running_reqs gauge\n'
                    f'sglang:num_running_reqs{{model_name="{cfg.model_id}"}} {self.stats.in_flight}\n'
                    f'# HELP sglang:prompt_tokens_total Number of prefill tokens processed.\n'
                    f'# TYPE sglang:prompt_tokens_total counter\n'
                    f'sglang:prompt_tokens_total{{model_name="{cfg.model_id}"}} {self.stats.generation_requests}\n'
                    ).encode()
            proto._write(_head(200, "text/plain; version=0.0.4", len(body)) + body)
            return True
        if path in ("/start_profile", "/stop_profile"):
            proto._write(_head(200, "text/plain", 0))
            return True
        if path in ("/flush_cache", "/health_generate"):
            if path == "/flush_cache" and self._engine is not None:
                self._engine.flush()
            proto._write(_head(200, "text/plain", 0))
            return True
        if path.startswith("/v1/responses/"):
            self._stored_response(proto, req.method, path[len("/v1/responses/"):])
            return True
        if path == "/_fake/stats":
            stats = self.stats.as_json()
            if self.config.simulate:
                stats["engine"] = self.engine.stats()
            self._json(proto, 200, stats)
            return True
        if path == "/_fake/kv_events":
            self._kv_events(proto, req)
            return True
        if path == "/_fake/reset_stats":
            self.reset_stats()
            self._json(proto, 200, {"ok": True})
            return True
        if path == "/_fake/config":
            if req.method == "POST":
                try:
                    self.set(**orjson.loads(bytes(req.body)))
                except (orjson.JSONDecodeError, TypeError, AttributeError) as e:
                    self._json(proto, 400, {"error": str(e)})
                    return True
            self._json(proto, 200, dataclasses.asdict(cfg))
            return True
        self._json(proto, 404, {"error": f"no route {path}"})
        return True

    def _kv_events(self, proto: _WorkerProtocol, req: _Request) -> None:
        """The simulated engine's event publisher: GET its state; POST faults
        ({"drop": n batches, "paused": bool, "restart": true, "reopen": true})."""
        events = self.engine.events if self.config.simulate else None
        if events is None:
            self._json(proto, 404, {"error": "no KV event publisher (--simulate --sim-kv-events-port)"})
            return
        if req.method == "POST":
            try:
                change = orjson.loads(bytes(req.body))
                if not isinstance(change, dict) or set(change) - {"drop", "paused", "restart", "reopen"}:
                    raise ValueError("takes drop, paused, restart, reopen")
            except (orjson.JSONDecodeError, ValueError) as e:
                self._json(proto, 400, {"error": str(e)})
                return
            if change.get("restart"):
                self.engine.cache.clear()       # an engine restarted has nothing cached
                events.restart()
            if change.get("reopen"):
                events.reopen()
            if "drop" in change:
                events.drop = int(change["drop"])
            if "paused" in change:
                events.paused = bool(change["paused"])
        self._json(proto, 200, {"endpoint": events.endpoint, "replay_endpoint": events.replay_endpoint,
                                "sequence": events.seq, "sent": events.sent, "paused": events.paused,
                                "cached_blocks": len(self.engine.cache.blocks)})

    def _stored_response(self, proto: _WorkerProtocol, method: str, rest: str) -> None:
        response_id, _, action = rest.partition("/")
        entry = self.stored.get(response_id)
        if entry is None:
            self._json(proto, 404, {"error": {"message": f"Response {response_id} not found", "type": "invalid_request_error",
                                              "code": "not_found"}})
            return
        doc, given = entry
        if action == "" and method == "GET":
            self._json(proto, 200, doc)
        elif action == "" and method == "DELETE":
            del self.stored[response_id]
            self._json(proto, 200, {"id": response_id, "object": "response.deleted", "deleted": True})
        elif action == "input_items" and method == "GET":
            items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": given}]}] \
                if isinstance(given, str) else (given or [])
            self._json(proto, 200, {"object": "list", "data": items, "has_more": False})
        elif action == "cancel" and method == "POST":
            self._json(proto, 400, {"error": {"message": "Only background responses can be cancelled",
                                              "type": "invalid_request_error", "code": "not_cancellable"}})
        else:
            self._json(proto, 404, {"error": f"no route {method} /v1/responses/{rest}"})

    async def handle(self, proto: _WorkerProtocol, req: _Request) -> None:
        cfg = self.config
        if req.path == "/health":
            await asyncio.sleep(cfg.health_delay)
            if cfg.healthy:
                proto._write(_head(200, "text/plain", 0))
            else:
                self._json(proto, 503, {"error": "unhealthy"})
            return
        if cfg.mode == "reset":
            proto.transport.abort()  # type: ignore[union-attr]
            return
        if cfg.mode == "stall":
            self.stats.in_flight += 1
            try:
                await asyncio.Event().wait()
            finally:
                self.stats.in_flight -= 1
                self.stats.disconnects += 1
        if cfg.mode == "garbage":
            proto._write(b"\x00\x01garbage that is not HTTP\r\n\r\n")
            proto.transport.close()  # type: ignore[union-attr]
            return
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            if cfg.response_delay > 0:
                await asyncio.sleep(cfg.response_delay)
            if cfg.simulate:
                await self._simulate(proto, req)
            else:
                await self._generate_stream(proto, req)
        except asyncio.CancelledError:
            self.stats.disconnects += 1
            raise
        finally:
            self.stats.in_flight -= 1

    def _parse_generation(self, proto: _WorkerProtocol, req: _Request) -> dict | None:
        st = self.stats
        st.generation_requests += 1
        st.last_request_at = time.monotonic()
        st.last_headers = req.headers
        st.last_body = bytes(req.body)
        cfg = self.config
        if cfg.api_key is not None and req.headers.get("authorization") != f"Bearer {cfg.api_key}":
            self._json(proto, 401, {"error": "bad worker api key"})
            return None
        if cfg.fail_status:
            if cfg.fail_count != 0:
                if cfg.fail_count > 0:
                    cfg.fail_count -= 1
                if cfg.fail_endless:
                    proto._write(_head(cfg.fail_status, "application/json", None) + _chunk(b'{"error": "stuck'))
                    return None
                self._json(proto, cfg.fail_status, {"error": f"injected failure {cfg.fail_status}"})
                return None
        if not cfg.parse_bodies:
            return {}
        try:
            body = req.json()
        except orjson.JSONDecodeError:
            self._json(proto, 400, {"error": "invalid json"})
            return None
        if not isinstance(body, dict):
            self._json(proto, 400, {"error": "body must be an object"})
            return None
        text = body.get("text")
        if type(text) is str and text.startswith("["):
            end = text.find("] ", 1, 40)
            if end > 0:
                tag = text[1:end]
                st.tags[tag] = st.tags.get(tag, 0) + 1
        rank = body.get("data_parallel_rank")
        if isinstance(rank, int):
            st.dp_ranks[rank] = st.dp_ranks.get(rank, 0) + 1
        if "bootstrap_room" in body or "bootstrap_host" in body:
            st.bootstrap.append(
                {k: body.get(k) for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")}
            )
        return body

    def _generate(self, proto: _WorkerProtocol, req: _Request, streaming_allowed: bool) -> bool:
        """Non-streamed answer, written at once. Returns False if the request
        streams (and so needs `handle`)."""
        if not streaming_allowed and self.config.parse_bodies:
            try:
                doc = req.json()
                if isinstance(doc, dict) and doc.get("stream"):
                    return False
            except orjson.JSONDecodeError:
                pass
        body = self._parse_generation(proto, req)
        if body is None:
            return True
        self._rid += 1
        self._json(proto, 200, self._complete_response(req.path, body))
        self.stats.completed += 1
        return True

    def _meta(self, body: dict, tokens: int) -> dict:
        meta: dict[str, Any] = {
            "id": f"{self.name}-{self._rid}",
            "finish_reason": {"type": "length", "length": tokens},
            "prompt_tokens": 1,
            "completion_tokens": tokens,
            "cached_tokens": 0,
            "worker": self.name,
        }
        for key in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
            if key in body:
                meta[key] = body[key]
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = [[-0.5, 1, f"{self.config.role}-in"]]
            meta["output_token_logprobs"] = [[-0.1, 2, f"{self.config.role}-out"]] * tokens
        return meta

    def _complete_response(self, path: str, body: dict) -> Any:
        cfg = self.config
        n = cfg.completion_tokens
        text = " ".join(["tok"] * n)
        if path == "/generate":
            items = body.get("text")
            if isinstance(items, list):
                out = []
                for i, _ in enumerate(items):
                    item = {k: (v[i] if isinstance(v, list) else v) for k, v in body.items() if k.startswith("bootstrap_")}
                    item["return_logprob"] = body.get("return_logprob")
                    out.append({"text": text, "meta_info": self._meta(item, n)})
                return out
            return {"text": text, "meta_info": self._meta(body, n)}
        if path == "/v1/chat/completions":
            return {
                "id": f"chatcmpl-{self._rid}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", cfg.model_id),
                "worker": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
            }
        if path == "/v1/completions":
            return {
                "id": f"cmpl-{self._rid}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.get("model", cfg.model_id),
                "worker": self.name,
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
            }
        if path == "/v1/embeddings":
            inputs = body.get("input")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            return {
                "object": "list",
                "model": body.get("model", cfg.model_id),
                "worker": self.name,
                "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            }
        if path == "/v1/responses":
            doc = {
                "id": f"resp_{self.port}_{self._rid}",
                "object": "response",
                "created_at": int(time.time()),
                "status": "completed",
                "model": body.get("model", cfg.model_id),
                "worker": self.name,
                "output": [{"type": "message", "id": f"msg_{self._rid}", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": 1, "output_tokens": n, "total_tokens": n + 1},
            }
            if body.get("store", True) is not False:
                self.stored[doc["id"]] = (doc, body.get("input"))
                while len(self.stored) > 1000:
                    del self.stored[next(iter(self.stored))]
            return doc
        if path == "/v1/messages":
            return {
                "id": f"msg_{self._rid}",
                "type": "message",
                "role": "assistant",
                "model": body.get("model", cfg.model_id),
                "worker": self.name,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "max_tokens",
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": n},
            }
        if path == "/v1/messages/count_tokens":
            return {"input_tokens": len(_prompt_text(body).split())}
        if path in ("/v1/rerank", "/rerank"):
            docs = body.get("documents") or []
            return [{"index": i, "score": 1.0 / (i + 1), "document": d, "worker": self.name} for i, d in enumerate(docs)]
        # /v1/classify
        return {"id": f"classify-{self._rid}", "object": "list", "worker": self.name, "data": [{"index": 0, "label": "fake", "probs": [1.0]}]}

    def _stream_event(self, path: str, body: dict, i: int, last: bool) -> bytes:
        if path == "/v1/messages":
            return self._messages_events(body, i, last)
        if path == "/generate":
            obj: Any = {"text": "tok " * (i + 1), "meta_info": self._meta(body, i + 1)}
            if not last:
                obj["meta_info"]["finish_reason"] = None
        elif path == "/v1/chat/completions":
            obj = {
                "id": f"chatcmpl-{self._rid}",
                "object": "chat.completion.chunk",
                "model": body.get("model", self.config.model_id),
                "worker": self.name,
                "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": "length" if last else None}],
            }
        else:
            obj = {
                "id": f"cmpl-{self._rid}",
                "object": "text_completion",
                "worker": self.name,
                "choices": [{"index": 0, "text": "tok ", "finish_reason": "length" if last else None}],
            }
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _messages_events(self, body: dict, i: int, last: bool) -> bytes:
        """The Anthropic API's stream: message_start and the text block's
        start before the first delta, the block's and the message's end
        after the last."""
        events: list[tuple[str, dict]] = []
        if i == 0:
            events.append(("message_start", {"type": "message_start", "message": {
                "id": f"msg_{self._rid}", "type": "message", "role": "assistant", "content": [],
                "model": body.get("model", self.config.model_id), "worker": self.name, "stop_reason": None,
                "usage": {"input_tokens": 1, "output_tokens": 0}}}))
            events.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {"type": "text", "text": ""}}))
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": "tok "}}))
        if last:
            events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
            events.append(("message_delta", {"type": "message_delta",
                                             "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                             "usage": {"output_tokens": i + 1}}))
            events.append(("message_stop", {"type": "message_stop"}))
        return b"".join(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n" for name, obj in events)

    def _stream_end(self, path: str) -> bytes:
        """The chunked body's end, after `data: [DONE]` on OpenAI-style streams."""
        return b"0\r\n\r\n" if path == "/v1/messages" else _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    async def _generate_stream(self, proto: _WorkerProtocol, req: _Request) -> None:
        body = self._parse_generation(proto, req)
        if body is None:
            return
        self._rid += 1
        if not body.get("stream"):
            self._json(proto, 200, self._complete_response(req.path, body))
            self.stats.completed += 1
            return
        cfg = self.config
        proto._write(_head(200, "text/event-stream", None))
        n = max(cfg.stream_chunks, 1)
        for i in range(n):
            if i and cfg.stream_interval > 0:
                await asyncio.sleep(cfg.stream_interval)
            if proto.closed:
                raise asyncio.CancelledError
            if cfg.drop_after_chunks >= 0 and i >= cfg.drop_after_chunks:
                proto.transport.close()  # type: ignore[union-attr]
                return
            proto._write(_chunk(self._stream_event(req.path, body, i, i == n - 1)))
        proto._write(self._stream_end(req.path))
        self.stats.completed += 1


    async def _simulate(self, proto: _WorkerProtocol, req: _Request) -> None:
        """Generation on the simulated engine: the first token comes after
        the prefill, the others one per decode step."""
        body = self._parse_generation(proto, req)
        if body is None:
            return
        self._rid += 1
        self.engine                 # made on first use, and with it the chat template
        prompt = None
        if self._chat_template is not None and req.path == "/v1/chat/completions":
            prompt = self._chat_template.render(body)     # as an engine renders a chat, then tokenizes it
        rendered = prompt is not None
        if prompt is None:
            prompt = _prompt_text(body)
        params = body.get("sampling_params") if isinstance(body.get("sampling_params"), dict) else {}
        tokens = params.get("max_new_tokens") or body.get("max_tokens") or self.config.completion_tokens
        tokens = tokens if isinstance(tokens, int) and 0 < tokens <= 4096 else self.config.completion_tokens
        stream = bool(body.get("stream"))
        if stream:
            proto._write(_head(200, "text/event-stream", None))
        produced = 0
        async for i in self.engine.generate(prompt, tokens, special=not rendered):
            if proto.closed:
                raise asyncio.CancelledError
            produced = i + 1
            if stream:
                proto._write(_chunk(self._stream_event(req.path, body, i, produced == tokens)))
        if stream:
            proto._write(self._stream_end(req.path))
        else:
            self._json(proto, 200, self._complete_response(req.path, body))
        self.stats.completed += 1


def _prompt_text(body: dict) -> str:
    """The prompt a generation request carries, as an engine would see it."""
    text = body.get("text", body.get("prompt"))
    if isinstance(text, str):
        return text
    messages = body.get("messages")
    if isinstance(messages, list):
        return " ".join(m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m smg.testing", description="Run fake SGLang-compatible workers.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--count", type=int, default=1, help="start this many workers on consecutive ports")
    parser.add_argument("--model-id", default="fake-model")
    parser.add_argument("--role", choices=["regular", "prefill", "decode"], default="regular")
    parser.add_argument("--stream-chunks", type=int, default=4)
    parser.add_argument("--stream-interval", type=float, default=0.0, help="seconds between streamed events")
    parser.add_argument("--response-delay", type=float, default=0.0)
    parser.add_argument("--no-parse", action="store_true",
                        help="answer generation requests without parsing their bodies (cheap load-test workers)")
    sim = parser.add_argument_group("simulated engine (routing-quality benchmarks; see docs/fleet-simulator.md)")
    sim.add_argument("--simulate", action="store_true",
                     help="model a prefix KV cache, a serial prefill queue and batched decode")
    sim.add_argument("--sim-cache-chars", type=int, default=1 << 20, help="prefix cache size per worker")
    sim.add_argument("--sim-prefill-chars-per-sec", type=float, default=200_000.0)
    sim.add_argument("--sim-max-running", type=int, default=32, help="requests past prefill at once")
    sim.add_argument("--sim-decode-step", type=float, default=0.008, help="seconds per decode step")
    sim.add_argument("--sim-tokenizer", metavar="PATH",
                     help="cache token blocks of this tokenizer.json (else blocks of 64 characters)")
    sim.add_argument("--sim-block-tokens", type=int, default=16, help="tokens per cache block")
    sim.add_argument("--sim-kv-events-port", type=int, default=0, metavar="PORT",
                     help="publish KV-cache events on PORT + i for worker i (needs --sim-tokenizer)")
    sim.add_argument("--sim-kv-replay-port", type=int, default=0, metavar="PORT",
                     help="answer event replays on PORT + i")
    args = parser.parse_args(argv)
    if args.sim_kv_events_port and not args.sim_tokenizer:
        parser.error("--sim-kv-events-port needs --sim-tokenizer")

    import uvloop

    workers = [
        FakeWorker(
            args.host,
            args.port + i,
            model_id=args.model_id,
            role=args.role,
            stream_chunks=args.stream_chunks,
            stream_interval=args.stream_interval,
            response_delay=args.response_delay,
            parse_bodies=not args.no_parse,
            simulate=args.simulate,
            sim_cache_chars=args.sim_cache_chars,
            sim_prefill_chars_per_sec=args.sim_prefill_chars_per_sec,
            sim_max_running=args.sim_max_running,
            sim_decode_step=args.sim_decode_step,
            sim_tokenizer=args.sim_tokenizer,
            sim_block_tokens=args.sim_block_tokens,
            sim_kv_events_port=args.sim_kv_events_port + i if args.sim_kv_events_port else 0,
            sim_kv_replay_port=args.sim_kv_replay_port + i if args.sim_kv_replay_port else 0,
        )
        for i in range(args.count)
    ]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(w.serve()) for w in workers]
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: [w._stopped and w._stopped.set() for w in workers])
        while any(w._server is None for w in workers) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        for t in tasks:
            if t.done():
                t.result()
        for w in workers:
            print(f"fake worker {w.name} serving {w.config.model_id} at {w.url}", flush=True)
        await asyncio.gather(*tasks)

    uvloop.run(run())


if __name__ == "__main__":
    main()

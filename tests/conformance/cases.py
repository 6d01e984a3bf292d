"""Conformance cases: requests sent to a gateway (the reference, to record;
smg, to compare) in a few set-ups, and the summary kept of each answer:
status, the error's code/type/param, the JSON shape, whether an event
stream ended with an error event and `[DONE]`.

Set-ups start their own fake workers (`python -m smg.testing`) and a
gateway in front of them. `run_all(command)` runs every set-up against the
gateway `command` (e.g. `["/tmp/ref/bin/smg", "launch"]` or
`[sys.executable, "-m", "smg"]`) and returns {case id: summary}.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Case:
    id: str
    method: str
    path: str
    body: Any = None                     # dict/list: JSON; str/bytes: sent as is
    headers: dict = field(default_factory=dict)


@dataclass
class ClientCase:
    """A call made with an official client library (`openai`, `anthropic`);
    what is kept is the exception it raises (or "ok"), the thing an
    application's error handling depends on."""
    id: str
    sdk: str                             # "openai" or "anthropic"
    call: str                            # "chat", "chat_stream", "messages", "messages_stream"
    model: str = "fake-model"
    api_key: str = "none"


@dataclass
class Setup:
    name: str
    workers: int                         # fake workers, regular
    args: list[str]                      # gateway flags (worker URLs added)
    worker_config: dict = field(default_factory=dict)   # POST /_fake/config after start
    cases: list[Case] = field(default_factory=list)
    clients: list[ClientCase] = field(default_factory=list)
    ready: str = "/readiness"            # waited for (200) before the cases
    stop_workers: bool = False           # stop the workers once the gateway has them (refused connections)


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}
MESSAGES = {"model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}

REGULAR = Setup("regular", 1, ["--policy", "round_robin", "--max-payload-size", "100000"], cases=[
    Case("generate", "POST", "/generate", {"text": "hi"}),
    Case("generate_stream", "POST", "/generate", {"text": "hi", "stream": True}),
    Case("chat", "POST", "/v1/chat/completions", CHAT),
    Case("chat_stream", "POST", "/v1/chat/completions", {**CHAT, "stream": True}),
    Case("completions", "POST", "/v1/completions", {"model": "fake-model", "prompt": "hi"}),
    Case("completions_stream", "POST", "/v1/completions", {"model": "fake-model", "prompt": "hi", "stream": True}),
    Case("embeddings", "POST", "/v1/embeddings", {"model": "fake-model", "input": "hi"}),
    Case("rerank_v1", "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
    Case("rerank", "POST", "/rerank", {"query": "q", "documents": ["a", "b"]}),
    Case("classify", "POST", "/v1/classify", {"model": "fake-model", "input": "hi"}),
    Case("chat_no_messages", "POST", "/v1/chat/completions", {"model": "fake-model"}),
    Case("chat_messages_not_list", "POST", "/v1/chat/completions", {"model": "fake-model", "messages": "hi"}),
    Case("chat_unknown_model", "POST", "/v1/chat/completions", {**CHAT, "model": "no-such-model"}),
    Case("chat_model_not_string", "POST", "/v1/chat/completions", {**CHAT, "model": 5}),
    Case("completions_no_prompt", "POST", "/v1/completions", {"model": "fake-model"}),
    Case("generate_bad_json", "POST", "/generate", "{not json"),
    Case("generate_not_object", "POST", "/generate", "[1, 2]"),
    Case("generate_empty_body", "POST", "/generate", ""),
    Case("generate_text_not_string", "POST", "/generate", {"text": 5}),
    Case("generate_too_large", "POST", "/generate", {"text": "x" * 200_000}),
    Case("generate_get", "GET", "/generate"),
    Case("unknown_route", "GET", "/no/such/route"),
    Case("unknown_route_post", "POST", "/v1/no-such", {"a": 1}),
    Case("health", "GET", "/health"),
    Case("health_head", "HEAD", "/health"),
    Case("liveness", "GET", "/liveness"),
    Case("readiness", "GET", "/readiness"),
    Case("health_generate", "GET", "/health_generate"),
    Case("models", "GET", "/v1/models"),
    Case("model_by_id", "GET", "/v1/models/fake-model"),
    Case("model_info", "GET", "/get_model_info"),
    Case("server_info", "GET", "/get_server_info"),
    Case("get_loads", "GET", "/get_loads"),
    Case("flush_cache", "POST", "/flush_cache"),
    Case("workers_list", "GET", "/workers"),
    Case("workers_get_unknown", "GET", "/workers/no-such-worker"),
    Case("workers_delete_unknown", "DELETE", "/workers/no-such-worker"),
    Case("workers_post_bad_json", "POST", "/workers", "{"),
    Case("workers_post_no_url", "POST", "/workers", {}),
    Case("workers_post_bad_url", "POST", "/workers", {"url": "ftp://x"}),
    Case("workers_put", "PUT", "/workers", {}),
    Case("workers_patch_unknown", "PATCH", "/workers/no-such-worker", {"priority": 1}),
    Case("responses", "POST", "/v1/responses", {"model": "fake-model", "input": "hi"}),
    Case("messages", "POST", "/v1/messages", MESSAGES),
    Case("messages_stream", "POST", "/v1/messages", {**MESSAGES, "stream": True}),
    Case("messages_no_max_tokens", "POST", "/v1/messages", {"model": "fake-model", "messages": MESSAGES["messages"]}),
    Case("messages_empty", "POST", "/v1/messages", {**MESSAGES, "messages": []}),
    Case("messages_not_list", "POST", "/v1/messages", {**MESSAGES, "messages": "hi"}),
    Case("messages_bad_role", "POST", "/v1/messages", {**MESSAGES, "messages": [{"role": "bot", "content": "x"}]}),
    Case("messages_unknown_model", "POST", "/v1/messages", {**MESSAGES, "model": "no-such-model"}),
    Case("messages_bad_json", "POST", "/v1/messages", "{not json"),
    Case("count_tokens", "POST", "/v1/messages/count_tokens", {"model": "fake-model", "messages": MESSAGES["messages"]}),
    Case("count_tokens_no_model", "POST", "/v1/messages/count_tokens", {"messages": MESSAGES["messages"]}),
    Case("responses_get_unknown", "GET", "/v1/responses/resp_unknown"),
    Case("responses_delete_unknown", "DELETE", "/v1/responses/resp_unknown"),
    Case("responses_input_items_unknown", "GET", "/v1/responses/resp_unknown/input_items"),
    Case("responses_cancel_unknown", "POST", "/v1/responses/resp_unknown/cancel", {}),
    Case("conversations_create", "POST", "/v1/conversations", {"metadata": {"topic": "a"}}),
    Case("conversations_get_unknown", "GET", "/v1/conversations/conv_unknown"),
    Case("conversations_delete_unknown", "DELETE", "/v1/conversations/conv_unknown"),
    Case("conversations_items_unknown", "GET", "/v1/conversations/conv_unknown/items"),
    Case("conversations_bad_metadata", "POST", "/v1/conversations", {"metadata": "x"}),
    Case("conversations_bad_json", "POST", "/v1/conversations", "{not json"),
    Case("start_profile", "POST", "/start_profile", {}),
    Case("engine_metrics", "GET", "/engine_metrics"),
    Case("request_id_echoed", "POST", "/generate", {"text": "hi"}, {"x-request-id": "conformance-1"}),
    Case("request_id_too_long", "POST", "/generate", {"text": "hi"}, {"x-request-id": "x" * 300}),
], clients=[
    ClientCase("openai_chat", "openai", "chat"),
    ClientCase("openai_chat_stream", "openai", "chat_stream"),
    ClientCase("openai_unknown_model", "openai", "chat", model="no-such-model"),
    ClientCase("anthropic_messages", "anthropic", "messages"),
    ClientCase("anthropic_messages_stream", "anthropic", "messages_stream"),
    ClientCase("anthropic_unknown_model", "anthropic", "messages", model="no-such-model"),
])

AUTH = Setup("auth", 1, ["--api-key", "sekret"], cases=[
    Case("auth_missing", "POST", "/generate", {"text": "hi"}),
    Case("auth_wrong", "POST", "/generate", {"text": "hi"}, {"authorization": "Bearer wrong"}),
    Case("auth_right", "POST", "/generate", {"text": "hi"}, {"authorization": "Bearer sekret"}),
    Case("auth_lowercase_scheme", "POST", "/generate", {"text": "hi"}, {"authorization": "bearer sekret"}),
    Case("auth_basic_scheme", "POST", "/generate", {"text": "hi"}, {"authorization": "Basic sekret"}),
    Case("auth_chat_missing", "POST", "/v1/chat/completions", CHAT),
    Case("auth_health_open", "GET", "/health"),
    Case("auth_models_missing", "GET", "/v1/models"),
    Case("auth_workers_missing", "GET", "/workers"),
    Case("auth_workers_right", "GET", "/workers", headers={"authorization": "Bearer sekret"}),
    Case("auth_messages_missing", "POST", "/v1/messages", MESSAGES),
    Case("auth_responses_get_missing", "GET", "/v1/responses/resp_unknown"),
], clients=[
    ClientCase("openai_wrong_key", "openai", "chat", api_key="wrong"),
    ClientCase("openai_right_key", "openai", "chat", api_key="sekret"),
])

EMPTY = Setup("no_workers", 0, [], ready="/liveness", cases=[
    Case("empty_generate", "POST", "/generate", {"text": "hi"}),
    Case("empty_chat", "POST", "/v1/chat/completions", CHAT),
    Case("empty_completions", "POST", "/v1/completions", {"model": "fake-model", "prompt": "hi"}),
    Case("empty_models", "GET", "/v1/models"),
    Case("empty_readiness", "GET", "/readiness"),
    Case("empty_health", "GET", "/health"),
    Case("empty_workers", "GET", "/workers"),
    Case("empty_loads", "GET", "/get_loads"),
    Case("empty_messages", "POST", "/v1/messages", MESSAGES),
], clients=[
    ClientCase("openai_zero_workers", "openai", "chat"),
    ClientCase("anthropic_zero_workers", "anthropic", "messages"),
])


def _failing(status: int) -> Setup:
    return Setup(f"worker_{status}", 1, ["--retry-max-retries", "2", "--disable-circuit-breaker"],
                 worker_config={"fail_status": status}, cases=[
                     Case(f"worker_{status}_generate", "POST", "/generate", {"text": "hi"}),
                     Case(f"worker_{status}_chat", "POST", "/v1/chat/completions", CHAT),
                     Case(f"worker_{status}_messages", "POST", "/v1/messages", MESSAGES),
                 ], clients=[ClientCase(f"openai_worker_{status}", "openai", "chat")])


BROKEN_STREAM = Setup("broken_stream", 1, ["--retry-max-retries", "2", "--disable-circuit-breaker"],
                      worker_config={"drop_after_chunks": 2, "stream_chunks": 6}, cases=[
                          Case("midstream_chat", "POST", "/v1/chat/completions", {**CHAT, "stream": True}),
                          Case("midstream_generate", "POST", "/generate", {"text": "hi", "stream": True}),
                      ], clients=[ClientCase("openai_midstream", "openai", "chat_stream")])

RESET = Setup("worker_reset", 1, ["--retry-max-retries", "2", "--disable-circuit-breaker"],
              worker_config={"mode": "reset"}, cases=[
                  Case("reset_generate", "POST", "/generate", {"text": "hi"}),
              ])

REFUSED = Setup("worker_refused", 1, ["--retry-max-retries", "2", "--disable-circuit-breaker",
                                     "--disable-health-check"], stop_workers=True, cases=[
                    Case("refused_generate", "POST", "/generate", {"text": "hi"}),
                    Case("refused_chat", "POST", "/v1/chat/completions", CHAT),
                ], clients=[ClientCase("openai_refused", "openai", "chat")])

BREAKER = Setup("breaker_open", 1, ["--retry-max-retries", "1", "--cb-failure-threshold", "1"],
                worker_config={"fail_status": 500}, cases=[
                    Case("breaker_trips", "POST", "/generate", {"text": "hi"}),
                    Case("breaker_open_generate", "POST", "/generate", {"text": "hi"}),
                    Case("breaker_open_chat", "POST", "/v1/chat/completions", CHAT),
                ], clients=[ClientCase("openai_breaker_open", "openai", "chat")])

SETUPS = [REGULAR, AUTH, EMPTY, _failing(400), _failing(429), _failing(500), _failing(503), BROKEN_STREAM, RESET,
          REFUSED, BREAKER]


# --- running -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port: int, method: str, path: str, body: Any = None, headers: Optional[dict] = None,
          timeout: float = 20.0) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if body is None:
            data = None
        elif isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            hdrs.setdefault("content-type", "application/json")
        else:
            data = body.encode() if isinstance(body, str) else body
            hdrs.setdefault("content-type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        try:
            payload = r.read()
        except (http.client.IncompleteRead, ConnectionError) as e:
            payload = getattr(e, "partial", b"") or b""
        return r.status, {k.lower(): v for k, v in r.getheaders()}, payload
    finally:
        conn.close()


def shape(doc: Any, depth: int = 0) -> Any:
    """Keys and value types, two levels deep (values themselves differ)."""
    if isinstance(doc, dict):
        if depth >= 2:
            return "object"
        return {k: shape(v, depth + 1) for k, v in sorted(doc.items())}
    if isinstance(doc, list):
        return [shape(doc[0], depth + 1)] if doc and depth < 2 else "array"
    if doc is None:
        return "null"
    return type(doc).__name__.replace("str", "string").replace("float", "number").replace("int", "number")


def summarize(case: Case, status: int, headers: dict, body: bytes) -> dict:
    out: dict[str, Any] = {"status": status}
    ctype = headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        events = [e[6:] for e in body.decode("utf-8", "replace").split("\n\n") if e.startswith("data: ")]
        out["sse"] = {"done": bool(events) and events[-1] == "[DONE]",
                      "error_event": any(e.startswith('{"error"') for e in events)}
        return out
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
        out["body"] = "not json"
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        out["error"] = {k: err.get(k) for k in ("code", "type", "param")}
    elif doc is not None:
        out["keys"] = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
    if status in (429, 503):
        out["retry_after"] = "retry-after" in headers
    if "x-request-id" in case.headers:
        out["request_id_echoed"] = headers.get("x-request-id") == case.headers["x-request-id"]
    return out


class _Workers:
    def __init__(self, count: int, config: dict):
        self.urls: list[str] = []
        self.proc = None
        if not count:
            return
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "smg.testing", "--port", str(port), "--count", str(count)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        self.urls = [f"http://127.0.0.1:{port + i}" for i in range(count)]
        _wait(lambda: all(_http(int(u.rsplit(":", 1)[1]), "GET", "/_fake/stats")[0] == 200 for u in self.urls),
              "fake workers")
        self.config = config

    def configure(self) -> None:
        for u in self.urls:
            if self.config:
                _http(int(u.rsplit(":", 1)[1]), "POST", "/_fake/config", self.config)

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait(10)


def _wait(pred, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def run_setup(setup: Setup, command: list[str], cwd: str) -> dict[str, dict]:
    workers = _Workers(setup.workers, setup.worker_config)
    port, metrics_port = free_port(), free_port()
    log = tempfile.NamedTemporaryFile(prefix=f"conformance-{setup.name}-", suffix=".log", delete=False)
    args = [*command, "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(metrics_port),
            *setup.args]
    if workers.urls:
        args += ["--worker-urls", *workers.urls]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    gw = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    try:
        _wait(lambda: gw.poll() is None and _http(port, "GET", setup.ready, timeout=2)[0] == 200,
              f"{setup.name} gateway ready (log {log.name})")
        workers.configure()
        if setup.stop_workers:
            workers.stop()
        out = {}
        for case in setup.cases:
            status, headers, body = _http(port, case.method, case.path, case.body, case.headers)
            out[case.id] = summarize(case, status, headers, body)
        for client in setup.clients:
            out[client.id] = {"client": run_client(client, port)}
        return out
    finally:
        gw.kill()
        gw.wait(10)
        workers.stop()


def run_client(case: ClientCase, port: int) -> str:
    """The exception the client library raised, by class name, or "ok"."""
    prompt = [{"role": "user", "content": "Hi"}]
    try:
        if case.sdk == "openai":
            import openai

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=case.api_key, max_retries=0,
                                   timeout=20)
            if case.call == "chat":
                client.chat.completions.create(model=case.model, messages=prompt)
            else:
                for _ in client.chat.completions.create(model=case.model, messages=prompt, stream=True):
                    pass
        else:
            import anthropic

            client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", auth_token=case.api_key,
                                         max_retries=0, timeout=20)
            if case.call == "messages":
                client.messages.create(model=case.model, max_tokens=8, messages=prompt)
            else:
                with client.messages.stream(model=case.model, max_tokens=8, messages=prompt) as stream:
                    for _ in stream.text_stream:
                        pass
    except Exception as e:  # noqa: BLE001 - the exception's type is the result
        return type(e).__name__
    return "ok"


def run_all(command: list[str], cwd: str) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for setup in SETUPS:
        results.update(run_setup(setup, command, cwd))
    return results

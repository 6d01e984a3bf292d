"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens),
proxied to workers that serve it, driven with the official `anthropic`
client: answers, streams, and errors in the API's own shape, from the
gateway and from workers alike."""

import json

import anthropic
import pytest

from helpers import request, wait_for
from smg._fast.routing_text import ENDPOINTS, routing_text

PROMPT = [{"role": "user", "content": "Hi"}]


def client(g, **kw):
    kw.setdefault("api_key", "none")
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{g.port}", max_retries=0, timeout=10, **kw)


def test_create_stream_and_count_tokens(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    c = client(g)
    msg = c.messages.create(model="fake-model", max_tokens=8, messages=PROMPT)
    assert msg.content[0].text == "tok " * 7 + "tok"
    with c.messages.stream(model="fake-model", max_tokens=8, messages=PROMPT) as stream:
        assert "".join(stream.text_stream) == "tok " * 4
    assert c.messages.count_tokens(model="fake-model", messages=[{"role": "user", "content": "a b c"}]).input_tokens == 3
    assert w.stats.requests["/v1/messages"] == 2 and w.stats.requests["/v1/messages/count_tokens"] == 1
    r = g.post("/v1/messages", {"model": "fake-model", "max_tokens": 8, "messages": PROMPT})
    assert r.headers["x-request-id"].startswith("msg_")


def test_the_key_is_taken_from_x_api_key_or_bearer(fake_workers, gateway):
    """Anthropic clients send x-api-key (better than the reference, which
    takes only Authorization: Bearer); a wrong or missing key is the API's
    authentication_error."""
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--api-key", "sekret"])
    wait_for(lambda: g.get("/readiness").status == 200, message="a ready worker")
    assert client(g, api_key="sekret").messages.create(model="fake-model", max_tokens=8, messages=PROMPT)
    assert client(g, api_key=None, auth_token="sekret").messages.create(model="fake-model", max_tokens=8,
                                                                         messages=PROMPT)
    # the worker gets the client's key as a bearer token, as on the other routes
    assert w.stats.last_headers["authorization"] == "Bearer sekret"
    for kw in ({"api_key": "wrong"}, {"api_key": None, "auth_token": "wrong"}):
        with pytest.raises(anthropic.AuthenticationError) as e:
            client(g, **kw).messages.create(model="fake-model", max_tokens=8, messages=PROMPT)
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    r = g.post("/v1/messages", {"model": "fake-model", "max_tokens": 8, "messages": PROMPT})
    assert r.status == 401 and r.json()["error"]["type"] == "authentication_error"
    # the OpenAI routes keep their own shape and take no x-api-key
    r = g.post("/v1/chat/completions", {"model": "fake-model", "messages": PROMPT}, headers={"x-api-key": "sekret"})
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body, message", [
    ({"model": "fake-model", "messages": PROMPT}, "'max_tokens' is required"),
    ({"max_tokens": 8, "messages": PROMPT}, "'model' is required"),
    ({"model": "fake-model", "max_tokens": 8, "messages": []}, "'messages' is required and cannot be empty"),
    ({"model": "fake-model", "max_tokens": 8, "messages": [{"role": "bot", "content": "x"}]}, "'role'"),
    ({"model": "fake-model", "max_tokens": "8", "messages": PROMPT}, "'max_tokens' must be an integer"),
])
def test_invalid_requests_are_refused_in_the_api_shape(fake_workers, gateway, body, message):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    r = g.post("/v1/messages", body)
    assert r.status == 400
    doc = r.json()
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    assert message in doc["error"]["message"] and doc["request_id"] == r.headers["x-request-id"]
    assert w.stats.requests.get("/v1/messages", 0) == 0


def test_gateway_errors_are_in_the_api_shape(gateway):
    g = gateway([])
    with pytest.raises(anthropic.NotFoundError) as e:
        client(g).messages.create(model="fake-model", max_tokens=8, messages=PROMPT)
    assert e.value.body["error"] == {"type": "not_found_error", "message": "No worker available for model 'fake-model'"}
    r = g.post("/v1/messages", b"{not json")
    assert r.status == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = request(g.port, "GET", "/v1/messages")
    assert r.status == 405 and r.json()["type"] == "error"


@pytest.mark.parametrize("status, error_type", [(400, "invalid_request_error"), (429, "rate_limit_error"),
                                                (500, "api_error"), (503, "overloaded_error")])
def test_worker_errors_are_rewritten_into_the_api_shape(fake_workers, gateway, status, error_type):
    """A worker's {"error": "..."} becomes {"type": "error", "error": {"type", "message"}}."""
    (w,) = fake_workers(1, fail_status=status)
    g = gateway(["--worker-urls", w.url, "--disable-retries", "--disable-circuit-breaker", "--disable-health-check"],
                wait_workers=1)
    r = g.post("/v1/messages", {"model": "fake-model", "max_tokens": 8, "messages": PROMPT})
    assert r.status == status
    doc = r.json()
    assert doc["error"] == {"type": error_type, "message": f"injected failure {status}"}
    assert doc["request_id"] == r.headers["x-request-id"]
    assert int(r.headers["content-length"]) == len(r.body)
    # errors already in the API's shape pass through as they are
    w.set(fail_status=0)
    r = g.post("/v1/messages", {"model": "fake-model", "max_tokens": 8, "messages": PROMPT})
    assert r.status == 200 and r.json()["type"] == "message"


def test_a_stream_broken_mid_way_ends_with_an_error_event(fake_workers, gateway):
    (w,) = fake_workers(1, drop_after_chunks=2, stream_chunks=6)
    g = gateway(["--worker-urls", w.url, "--disable-circuit-breaker"], wait_workers=1)
    r = g.post("/v1/messages", {"model": "fake-model", "max_tokens": 8, "messages": PROMPT, "stream": True})
    events = [e for e in r.body.decode().split("\n\n") if e]
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert error["request_id"] == r.headers["x-request-id"]
    assert "[DONE]" not in r.body.decode()
    with pytest.raises(anthropic.APIStatusError):
        with client(g).messages.stream(model="fake-model", max_tokens=8, messages=PROMPT) as stream:
            for _ in stream.text_stream:
                pass


def test_routing_text_is_the_system_prompt_and_the_messages():
    body = {"system": [{"type": "text", "text": "You are terse."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                         {"role": "assistant", "content": "Hello"}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        assert routing_text(ENDPOINTS[path], body) == "You are terse. Hi Hello"
    assert routing_text(ENDPOINTS["/v1/messages"], {"system": "S", "messages": []}) == "S"


def test_same_conversation_prefix_lands_on_the_same_worker(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--worker-urls", *[w.url for w in workers], "--policy", "cache_aware"], wait_workers=3)
    system = "You are a helpful assistant for the billing team. " * 8
    served = set()
    for i in range(6):
        r = g.post("/v1/messages", {"model": "fake-model", "max_tokens": 8, "system": system,
                                    "messages": [{"role": "user", "content": f"question {i}"}]})
        assert r.status == 200
        served.add(r.json()["worker"])
    assert len(served) == 1

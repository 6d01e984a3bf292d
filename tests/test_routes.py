"""Every route the gateway serves, through the real gateway and fake workers."""

import json
import re

import pytest
from helpers import free_port, request, wait_for

PROXIED = [
    ("/generate", {"text": "hello world", "sampling_params": {"max_new_tokens": 4}}),
    ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": "fake-model", "prompt": "once upon"}),
    ("/v1/embeddings", {"model": "fake-model", "input": "embed me"}),
    ("/v1/rerank", {"model": "fake-model", "query": "q", "documents": ["a", "b"]}),
    ("/rerank", {"model": "fake-model", "query": "q", "documents": ["a", "b"]}),
    ("/v1/classify", {"model": "fake-model", "input": "classify me"}),
    ("/v1/responses", {"model": "fake-model", "instructions": "be brief", "input": "respond"}),
]


@pytest.fixture
def two(fake_workers, gateway):
    workers = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--worker-urls", *[w.url for w in workers]], wait_workers=2)
    return g, workers


@pytest.mark.parametrize("path, body", PROXIED)
def test_proxied_routes_forward_body_bytes_unchanged(two, path, body):
    g, workers = two
    # deliberately odd formatting: the gateway must not re-serialize
    raw = b'{ "zz": 1,\n  ' + __import__("json").dumps(body)[1:].encode()
    r = g.post(path, raw, headers={"x-request-id": "rid-123"})
    assert r.status == 200, r
    assert r.headers["x-request-id"] == "rid-123"
    served = [w for w in workers if w.stats.requests.get(path)]
    assert len(served) == 1
    assert served[0].stats.last_body == raw
    assert served[0].stats.last_headers["x-request-id"] == "rid-123"
    assert r.headers["x-smg-routed-worker-id"] == served[0].url


def test_health_and_liveness(two):
    g, _ = two
    for path in ("/health", "/liveness"):
        r = g.get(path)
        assert (r.status, r.body) == (200, b"OK")


def test_readiness_reports_workers(two):
    g, _ = two
    r = g.get("/readiness")
    assert r.status == 200
    assert r.json() == {"status": "ready", "healthy_workers": 2, "total_workers": 2}


def test_readiness_without_workers_is_503(gateway):
    g = gateway([])
    r = g.get("/readiness")
    assert r.status == 503
    assert r.json() == {"status": "not ready", "reason": "insufficient healthy workers"}


def test_models_are_deduplicated(two):
    g, _ = two
    r = g.get("/v1/models")
    assert r.status == 200
    assert r.json() == {"object": "list",
                        "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "self_hosted"}]}


@pytest.mark.parametrize("path", ["/get_server_info", "/get_model_info", "/health_generate"])
def test_info_routes_forward_to_a_healthy_worker(two, path):
    g, workers = two
    before = sum(w.stats.requests.get(path, 0) for w in workers)
    r = g.get(path)
    assert r.status == 200
    assert sum(w.stats.requests.get(path, 0) for w in workers) == before + 1
    if path != "/health_generate":
        assert r.json()["model_path"] == "fake-model"


def test_info_route_without_workers_is_503(gateway):
    g = gateway([])
    r = g.get("/get_server_info")
    assert r.status == 503
    assert r.json()["error"]["code"] == "no_available_workers"
    assert r.headers["x-smg-error-code"] == "no_available_workers"


def test_flush_cache_reaches_every_worker(two):
    g, workers = two
    r = g.post("/flush_cache", None)
    assert r.status == 200
    body = r.json()
    assert body["status"] == "success" and body["workers_flushed"] == 2
    assert all(w.stats.requests.get("/flush_cache") == 1 for w in workers)


def test_flush_cache_partial_failure_is_206(two):
    g, workers = two
    workers[1].stop()
    r = g.post("/flush_cache", None)
    assert r.status == 206
    body = r.json()
    assert body["workers_flushed"] == 1
    assert [f["worker_url"] for f in body["failed_workers"]] == [workers[1].url]


def test_get_loads_collects_worker_reports(two):
    g, workers = two
    r = g.get("/get_loads")
    assert r.status == 200
    body = r.json()
    assert set(body) == {"timestamp", "version", "dp_rank_count", "loads"}
    assert body["dp_rank_count"] == 2
    assert sorted(l["worker"] for l in body["loads"]) == sorted(w.url for w in workers)


def test_workers_listing_shape(two):
    g, workers = two
    body = g.get("/workers").json()
    assert body["total"] == 2
    assert body["stats"] == {"prefill_count": 0, "decode_count": 0, "regular_count": 2}
    for info in body["workers"]:
        for key in ("id", "url", "model_id", "worker_type", "bootstrap_port", "labels", "is_healthy", "status",
                    "load"):
            assert key in info, key
        assert re.fullmatch(r"[0-9a-f-]{36}", info["id"])
        assert info["worker_type"] == "regular"
        assert info["status"] == "ready" and info["is_healthy"] is True
        assert info["model_id"] == "fake-model"
        assert info["bootstrap_port"] is None and info["load"] == 0
    assert sorted(i["url"] for i in body["workers"]) == sorted(w.url for w in workers)


def test_worker_by_id(two):
    g, _ = two
    info = g.get("/workers").json()["workers"][0]
    r = g.get(f"/workers/{info['id']}")
    assert r.status == 200 and r.json()["url"] == info["url"]
    assert g.get("/workers/00000000-0000-0000-0000-000000000000").status == 404
    assert g.get("/workers/not-a-uuid").status == 400


def test_unknown_route_and_wrong_method(two):
    g, _ = two
    r = g.post("/nope", {})
    assert r.status == 404 and r.json()["error"]["code"] == "unknown_url"
    r = g.get("/generate")
    assert r.status == 405
    assert r.headers["x-smg-error-code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


def test_error_shapes(two):
    g, _ = two
    r = g.post("/generate", b"{not json")
    assert r.status == 400
    assert r.headers["x-smg-error-code"] == "json_parse_error"
    err = r.json()["error"]
    assert set(err) == {"type", "code", "message", "param"} and err["param"] is None
    r = g.post("/v1/chat/completions", {"model": "other-model", "messages": []})
    assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"
    for bad in (b"[1, 2]", b'"text"', b"42", b"null"):
        r = g.post("/generate", bad)
        assert r.status == 400 and r.json()["error"]["code"] == "invalid_request", bad


def test_no_workers_is_404_model_not_found(gateway):
    """As on the reference: with no workers every model is unknown, and
    /v1/models says there are none."""
    g = gateway([])
    r = g.post("/generate", {"text": "hi"})
    assert r.status == 404
    assert r.json()["error"]["code"] == "model_not_found"
    r = g.post("/v1/chat/completions", {"model": "m", "messages": []})
    assert r.status == 404 and "'m'" in r.json()["error"]["message"]
    r = g.get("/v1/models")
    assert r.status == 503 and r.json()["error"]["code"] == "no_models_available"


def test_request_ids(two):
    g, workers = two
    r = g.post("/generate", {"text": "a"})
    assert re.fullmatch(r"gnt-[0-9A-Za-z]{24}", r.headers["x-request-id"])
    r = g.post("/v1/chat/completions", {"messages": []})
    assert r.headers["x-request-id"].startswith("chatcmpl-")
    r = g.post("/generate", {"text": "a"}, headers={"x-correlation-id": "corr-1"})
    assert r.headers["x-request-id"] == "corr-1"
    r = g.post("/generate", {"text": "a"}, headers={"request-id": "r-2", "x-trace-id": "t-1"})
    assert r.headers["x-request-id"] == "t-1"
    r = g.get("/health")
    assert r.headers["x-request-id"].startswith("req-")


def test_forwarded_headers(two):
    g, workers = two
    g.post("/generate", {"text": "a"}, headers={
        "authorization": "Bearer client", "traceparent": "00-abc-def-01", "tracestate": "k=v",
        "x-smg-routing-key": "rk", "x-custom": "dropped", "connection": "keep-alive"})
    w = max(workers, key=lambda w: w.stats.generation_requests)
    h = w.stats.last_headers
    assert h["authorization"] == "Bearer client"
    assert h["traceparent"] == "00-abc-def-01"
    assert h["tracestate"] == "k=v"
    assert h["x-smg-routing-key"] == "rk"
    assert "x-custom" not in h


def test_metrics_endpoint_has_reference_names(two):
    g, _ = two
    g.post("/generate", {"text": "a"})
    g.get("/health")
    text = g.metrics()
    assert re.search(r'smg_http_requests_total\{method="POST",path="/generate"\} 1\.0', text)
    assert re.search(r'smg_http_responses_total\{error_code="",path="/generate",status_code="200"\} 1\.0', text)
    assert 'smg_http_request_duration_seconds_bucket{le="0.001",method="POST",path="/generate"}' in text
    assert "smg_http_connections_active" in text
    for name in ("smg_worker_requests_total", "smg_worker_requests_active", "smg_worker_health",
                 "smg_worker_cb_state", "smg_worker_pool_size"):
        assert name in text, name
    assert re.search(r'smg_worker_pool_size\{connection_mode="http",model="fake-model",worker_type="regular"\} 2\.0',
                     text)


def test_request_ids_wait(two):
    """The metrics count a request once its response went out."""
    g, _ = two
    g.post("/v1/completions", {"prompt": "x"})
    wait_for(lambda: 'path="/v1/completions",status_code="200"' in g.metrics(), message="completion counted")


def test_one_model_by_id(two):
    g, _ = two
    r = g.get("/v1/models/fake-model")
    assert r.status == 200 and r.json() == {"id": "fake-model", "object": "model", "created": 0,
                                            "owned_by": "self_hosted"}
    r = g.get("/v1/models/other")
    assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"


def test_profiling_fans_out_to_every_worker(two):
    g, workers = two
    for path in ("/start_profile", "/stop_profile"):
        r = g.post(path, {})
        assert r.status == 200, r
        body = r.json()
        assert body["workers_profiled"] == body["total_workers"] == 2 and body["failed"] == []
        assert sorted(body["successful"]) == sorted(w.url for w in workers)
        assert all(w.stats.requests.get(path) == 1 for w in workers)


def test_engine_metrics_label_each_workers_samples(two):
    g, workers = two
    r = g.get("/engine_metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    assert text.count("# TYPE sglang:num_running_reqs gauge") == 1
    for w in workers:
        assert f'sglang:num_running_reqs{{model_name="fake-model",worker="{w.url}"}} 0' in text


def test_router_metrics_follow_the_reference(fake_workers, gateway):
    """smg_router_*: routed requests by model label (the served model,
    "unknown" when none is named, "other" when it is not served), errors by
    type, upstream answers by status, durations."""
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--retry-max-retries", "2"], wait_workers=1)
    assert g.post("/generate", {"text": "a"}).status == 200
    assert g.post("/v1/chat/completions", {"model": "fake-model", "stream": True,
                                           "messages": [{"role": "user", "content": "hi"}]}).status == 200
    assert g.post("/v1/chat/completions", {"model": "nope", "messages": []}).status == 404
    assert g.post("/v1/chat/completions", {"model": "fake-model"}).status == 400  # not routed
    w.set(mode="reset")
    assert g.post("/generate", {"text": "b"}).status == 500
    w.set(mode="normal")
    text = g.metrics()
    common = 'connection_mode="http",'
    for endpoint, model, streaming, n in (("generate", "unknown", "false", 2), ("chat", "fake-model", "true", 1),
                                          ("chat", "other", "false", 1)):
        assert (f'smg_router_requests_total{{backend_type="regular",{common}endpoint="{endpoint}",model="{model}",'
                f'router_type="http",streaming="{streaming}"}} {n}.0') in text, (endpoint, model)
    assert ('smg_router_request_errors_total{backend_type="regular",connection_mode="http",endpoint="chat",'
            'error_type="no_workers",model="other",router_type="http"} 1.0') in text
    assert ('smg_router_request_errors_total{backend_type="regular",connection_mode="http",endpoint="generate",'
            'error_type="backend_error",model="unknown",router_type="http"} 1.0') in text
    assert 'smg_router_upstream_responses_total{error_code="",router_type="http",status_code="200"} 2.0' in text
    # each failed send (a resend after a keep-alive race is a retry, not an answer)
    assert re.search(r'smg_router_upstream_responses_total\{error_code="upstream_error",router_type="http",'
                     r'status_code="502"\} [12]\.0', text)
    assert ('smg_router_request_duration_seconds_count{backend_type="regular",connection_mode="http",'
            'endpoint="generate",model="unknown",router_type="http"} 2.0') in text


def test_worker_info_has_the_reference_fields(two):
    """GET /workers: the reference's WorkerInfo, labels from the engine's
    server and model info included (recorded from smg==1.13.0 on the same
    fake worker)."""
    g, workers = two
    info = next(w for w in g.workers() if w["url"] == workers[0].url)
    assert info["models"][0]["model_type"] == ["chat", "completions", "responses", "tools"]
    assert info["labels"] == {
        "dp_size": "1", "version": "0.0.0-fake", "tp_size": "1", "model_path": "fake-model",
        "served_model_name": "fake-model", "architectures": '["FakeForCausalLM"]', "model_type": "fake",
        "tokenizer_path": "fake-model", "is_generation": "true", "max_running_requests": "256",
        "has_image_understanding": "false"}
    assert (info["priority"], info["cost"], info["max_connection_attempts"], info["http2"]) == (50, 1.0, 20, False)


def test_health_check_port_answers_the_probes_on_its_own_listener(fake_workers, gateway):
    (w,) = fake_workers(1)
    port = free_port()
    g = gateway(["--worker-urls", w.url, "--health-check-port", str(port)], wait_workers=1)
    for path in ("/health", "/liveness", "/readiness"):
        assert request(port, "GET", path).status == 200, path
    assert request(port, "POST", "/generate", {"text": "x"}).status == 404  # probes only
    assert g.post("/generate", {"text": "x"}).status == 200


def test_request_id_headers_choose_where_the_id_comes_from(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--request-id-headers", "X-Amzn-Trace-Id", "x-my-id"], wait_workers=1)
    r = g.post("/generate", {"text": "a"}, headers={"x-my-id": "mine-1", "x-amzn-trace-id": "amzn-1"})
    assert r.headers["x-request-id"] == "amzn-1"  # the first configured header present wins
    assert w.stats.last_headers["x-request-id"] == "amzn-1"
    r = g.post("/generate", {"text": "a"}, headers={"x-my-id": "mine-2"})
    assert r.headers["x-request-id"] == "mine-2"
    # the defaults no longer count: an id is made
    r = g.post("/generate", {"text": "a"}, headers={"x-request-id": "default-header"})
    assert r.headers["x-request-id"] != "default-header" and r.headers["x-request-id"].startswith("gnt-")


def test_cors_for_allowed_origins_only(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--api-key", "k", "--worker-urls", w.url, "--cors-allowed-origins", "http://app.example",
                 "https://ui.example"])
    wait_for(lambda: g.get("/readiness").status == 200, message="ready")
    # a preflight needs no credentials and is answered by the gateway
    r = request(g.port, "OPTIONS", "/v1/chat/completions", headers={
        "origin": "http://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert r.status == 200
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    assert w.stats.generation_requests == 0
    # answers to an allowed origin carry the header, proxied or not
    auth = {"authorization": "Bearer k", "origin": "https://ui.example"}
    r = g.post("/generate", {"text": "a"}, headers=auth)
    assert r.status == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    r = g.post("/generate", {"text": "a"}, headers={"origin": "https://ui.example"})
    assert r.status == 401 and r.headers["access-control-allow-origin"] == "https://ui.example"
    # another origin gets nothing, and no preflight answer
    r = g.post("/generate", {"text": "a"}, headers={"authorization": "Bearer k", "origin": "http://evil.example"})
    assert r.status == 200 and "access-control-allow-origin" not in r.headers
    r = request(g.port, "OPTIONS", "/generate", headers={"origin": "http://evil.example",
                                                             "access-control-request-method": "POST"})
    assert r.status == 405 and "access-control-allow-origin" not in r.headers


def test_no_cors_headers_without_the_flag(two):
    g, _ = two
    r = g.post("/generate", {"text": "a"}, headers={"origin": "http://app.example"})
    assert r.status == 200 and "access-control-allow-origin" not in r.headers


def test_model_alias_routes_and_rewrites_the_model(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--model-alias", "gpt-4o=fake-model", "--model-alias", "mini=fake-model"],
                wait_workers=1)
    for alias in ("gpt-4o", "mini"):
        r = g.post("/v1/chat/completions", {"model": alias, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status == 200
        assert json.loads(w.stats.last_body)["model"] == "fake-model"
    raw = b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}'
    assert g.post("/v1/chat/completions", raw).status == 200
    assert w.stats.last_body == raw  # no alias: the client's bytes, unchanged
    r = g.post("/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"


def test_rerank_answers_in_the_reference_shape(two):
    g, _ = two
    r = g.post("/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert r.status == 200
    body = r.json()
    assert body["object"] == "rerank" and body["model"] == "unknown" and body["usage"] is None
    assert body["results"] == [{"score": 1.0, "document": "a", "index": 0}, {"score": 0.5, "document": "b", "index": 1}]
    assert isinstance(body["created"], int)
    r = g.post("/rerank", {"query": "q", "documents": ["a"]})
    assert r.status == 400 and (r.json()["error"]["code"], r.json()["error"]["param"]) == \
        ("missing_required_parameter", "model")
    r = g.post("/rerank", {"model": "fake-model", "query": "q", "documents": ["a"]})
    assert r.status == 200 and r.json()["model"] == "fake-model" and len(r.json()["results"]) == 1


def test_prometheus_duration_buckets(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--prometheus-duration-buckets", "1", "0.01", "0.1"], wait_workers=1)
    assert g.post("/generate", {"text": "a"}).status == 200
    text = g.metrics()
    les = re.findall(r'smg_http_request_duration_seconds_bucket\{le="([^"]+)",method="POST",path="/generate"\}', text)
    assert les == ["0.01", "0.1", "1", "+Inf"]
    assert 'smg_http_request_duration_seconds_bucket{le="+Inf",method="POST",path="/generate"} 1.0' in text
    assert re.findall(r'smg_router_request_duration_seconds_bucket\{[^}]*le="([^"]+)"', text) == les


def test_stored_responses_are_asked_of_every_worker(fake_workers, gateway):
    """GET/DELETE /v1/responses/{id}, .../input_items and .../cancel: the
    gateway stores nothing; the worker that made the response (an engine
    with `store`) answers. Unknown ids get the reference's 404."""
    workers = fake_workers(2)
    g = gateway(["--worker-urls", *[w.url for w in workers], "--policy", "round_robin"], wait_workers=2)
    made = [g.post("/v1/responses", {"model": "fake-model", "input": f"hi {i}"}).json() for i in range(2)]
    assert {m["worker"] for m in made} == {w.name for w in workers}
    for i, m in enumerate(made):
        r = g.get(f"/v1/responses/{m['id']}")
        assert r.status == 200 and r.json() == m
        assert r.headers["x-smg-routed-worker-id"].endswith(m["worker"])
        r = g.get(f"/v1/responses/{m['id']}/input_items?limit=5")
        assert r.status == 200 and r.json()["data"][0]["content"][0]["text"] == f"hi {i}"
    # a refusal other than "unknown id" comes back as the worker said it
    r = request(g.port, "POST", f"/v1/responses/{made[0]['id']}/cancel", {})
    assert r.status == 400 and r.json()["error"]["code"] == "not_cancellable"
    r = request(g.port, "DELETE", f"/v1/responses/{made[1]['id']}")
    assert r.status == 200 and r.json()["deleted"] is True
    for method, path in (("GET", made[1]["id"]), ("DELETE", made[1]["id"]), ("GET", "resp_nope/input_items"),
                         ("POST", "resp_nope/cancel")):
        r = request(g.port, method, f"/v1/responses/{path}", {} if method == "POST" else None)
        assert r.status == 404, (method, path)
        assert r.json()["error"]["code"] == "not_found" and r.headers["x-smg-error-code"] == "not_found"
    assert request(g.port, "PUT", "/v1/responses/x").status == 405
    assert request(g.port, "GET", "/v1/responses/x/other").status == 404

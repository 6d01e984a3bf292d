"""Prefill/decode disaggregation with fake prefill and decode workers (which
echo the bootstrap fields they received)."""

import concurrent.futures
import json
import re
import time
import socket

import pytest
from helpers import post_raw, raw_exchange, request, wait_for
from k8s_api import make_pod


def pd_gateway(gateway, prefills, decodes, *extra, bootstrap_ports=None):
    args = ["--pd-disaggregation", "--policy", "round_robin"]
    for i, p in enumerate(prefills):
        port = (bootstrap_ports or {}).get(i)
        args += ["--prefill", p.url] + ([str(port)] if port else [])
    for d in decodes:
        args += ["--decode", d.url]
    return gateway(args + list(extra), wait_workers=len(prefills) + len(decodes))


def test_both_sides_get_the_same_room_and_the_prefill_address(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill")
    (d,) = fake_workers(1, role="decode")
    g = pd_gateway(gateway, [p], [d], bootstrap_ports={0: 9100})
    rooms = set()
    for i in range(5):
        r = g.post("/generate", {"text": f"hello {i}"})
        assert r.status == 200
        meta = r.json()["meta_info"]
        assert meta["worker"] == d.name  # the client gets decode's answer
        rooms.add(meta["bootstrap_room"])
    assert len(rooms) == 5
    # the client's answer is decode's: prefill's may still be under way
    wait_for(lambda: len(p.stats.bootstrap) == 5, message="prefill got all 5")
    assert p.stats.bootstrap == d.stats.bootstrap
    for b in p.stats.bootstrap:
        assert b["bootstrap_host"] == "127.0.0.1" and b["bootstrap_port"] == 9100
        assert isinstance(b["bootstrap_room"], int) and 0 <= b["bootstrap_room"] < 2 ** 63
    # the body reached both unchanged apart from the added fields
    sent = json.loads(p.stats.last_body)
    assert sent["text"] == "hello 4" and set(sent) == {"text", "bootstrap_host", "bootstrap_port", "bootstrap_room"}


def test_no_bootstrap_port_is_null_and_client_values_are_overwritten(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill")
    (d,) = fake_workers(1, role="decode")
    g = pd_gateway(gateway, [p], [d])
    r = g.post("/generate", {"text": "x", "bootstrap_host": "evil", "bootstrap_port": 1, "bootstrap_room": 7})
    assert r.status == 200
    b = d.stats.bootstrap[-1]
    assert b["bootstrap_host"] == "127.0.0.1" and b["bootstrap_port"] is None and b["bootstrap_room"] != 7


def test_batch_requests_get_one_room_per_item(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill")
    (d,) = fake_workers(1, role="decode")
    g = pd_gateway(gateway, [p], [d], bootstrap_ports={0: 9200})
    r = g.post("/generate", {"text": ["a", "b", "c"]})
    assert r.status == 200
    b = d.stats.bootstrap[-1]
    assert b["bootstrap_host"] == ["127.0.0.1"] * 3 and b["bootstrap_port"] == [9200] * 3
    assert len(set(b["bootstrap_room"])) == 3
    wait_for(lambda: len(p.stats.bootstrap) == 1, message="prefill got the request")
    assert p.stats.bootstrap[-1] == b
    assert [item["meta_info"]["bootstrap_room"] for item in r.json()] == b["bootstrap_room"]


def test_decode_streams_while_prefill_is_still_answering(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill", response_delay=3.0)
    (d,) = fake_workers(1, role="decode", stream_chunks=5, stream_interval=0.1)
    g = pd_gateway(gateway, [p], [d])
    body = json.dumps({"text": "x", "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    with s:
        s.sendall(post_raw("/generate", body))
        data = b""
        while b"data: " not in data:
            chunk = s.recv(65536)
            assert chunk
            data += chunk
        # decode output is here, and prefill has not answered yet (it takes 3 s)
        assert p.stats.completed == 0
        wait_for(lambda: p.stats.in_flight == 1, timeout=2, message="prefill working on the request")
        assert p.stats.completed == 0
        while not data.endswith(b"0\r\n\r\n"):
            data += s.recv(65536)
    assert data.count(b"data: ") == 6
    wait_for(lambda: all(w["load"] == 0 for w in g.workers()), message="both workers released")


# A real decode worker answers only after prefill's KV cache reached it; the
# fake decode workers model that with a short delay where the order matters.
KV_TRANSFER = 0.3


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_a_failing_side_is_a_clear_error_and_releases_both(fake_workers, gateway, side):
    (p,) = fake_workers(1, role="prefill")
    (d,) = fake_workers(1, role="decode", response_delay=KV_TRANSFER)
    g = pd_gateway(gateway, [p], [d], "--disable-retries")
    (p if side == "prefill" else d).set(fail_status=400)
    r = g.post("/generate", {"text": "x"})
    assert r.status == 400
    err = r.json()["error"]
    assert err["code"] == f"{side}_failed" and "injected failure 400" in err["message"]
    assert r.headers["x-smg-error-code"] == f"{side}_failed"
    wait_for(lambda: all(w["load"] == 0 for w in g.workers()), message="both workers released")


def test_prefill_failing_mid_stream_ends_the_stream_with_an_error(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill", response_delay=0.5, fail_status=500)
    (d,) = fake_workers(1, role="decode", stream_chunks=20, stream_interval=0.1)
    g = pd_gateway(gateway, [p], [d], "--disable-retries")
    data = raw_exchange(g.port, post_raw("/generate", json.dumps({"text": "x", "stream": True}).encode()), timeout=10)
    assert data.startswith(b"HTTP/1.1 200")
    # not completed: decode was cut off, and the stream says so
    events = re.findall(rb"data: (.*?)\n\n", data)
    assert 1 <= len(events) < 20 and events[-1] == b"[DONE]" and b'"upstream_error"' in events[-2]
    assert data.endswith(b"0\r\n\r\n")
    wait_for(lambda: d.stats.disconnects == 1, message="decode request cancelled")
    wait_for(lambda: all(w["load"] == 0 for w in g.workers()), message="both workers released")


def test_unreachable_side_is_502(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill")
    (d,) = fake_workers(1, role="decode")
    g = pd_gateway(gateway, [p], [d], "--disable-retries", "--disable-health-check")
    d.stop()
    r = g.post("/generate", {"text": "x"})
    assert r.status == 502 and r.json()["error"]["code"] == "worker_unreachable"
    wait_for(lambda: all(w["load"] == 0 for w in g.workers()), message="prefill released")


def test_retry_picks_a_new_pair(fake_workers, gateway):
    p_bad, p_good = fake_workers(2, role="prefill")
    (d,) = fake_workers(1, role="decode", response_delay=KV_TRANSFER)
    g = pd_gateway(gateway, [p_bad, p_good], [d], "--retry-initial-backoff-ms", "1", "--disable-circuit-breaker")
    p_bad.set(fail_status=503)
    for i in range(4):
        r = g.post("/generate", {"text": f"x{i}"})
        assert r.status == 200
    # every success went through the good prefill, with a fresh room each time
    good_rooms = [b["bootstrap_room"] for b in p_good.stats.bootstrap]
    assert len(good_rooms) == 4
    assert [b["bootstrap_room"] for b in d.stats.bootstrap if b["bootstrap_room"] in good_rooms]
    assert p_bad.stats.generation_requests >= 1
    assert 'smg_worker_retries_total{endpoint="generate",worker_type="prefill"}' in g.metrics()


def test_a_long_prompt_is_retried_on_a_new_pair_by_its_text_read_again(fake_workers, gateway):
    """A PD call keeps neither the parsed body nor a routing text over 64 Ki
    characters once routed; a retry reads the text from the body again, and
    both sides still get the prompt and the bootstrap fields."""
    prefills = fake_workers(2, role="prefill")
    (d,) = fake_workers(1, role="decode", response_delay=KV_TRANSFER)
    g = pd_gateway(gateway, prefills, [d], "--prefill-policy", "cache_aware", "--retry-initial-backoff-ms", "1",
                   "--disable-circuit-breaker")
    prompt = "[long] " + "p" * 100_000
    first = g.post("/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 4}})
    assert first.status == 200
    wait_for(lambda: sum(p.stats.generation_requests for p in prefills) == 1, message="the first prefill")
    owner = max(prefills, key=lambda p: p.stats.generation_requests)
    owner.set(fail_status=503, fail_count=1)
    again = g.post("/generate", {"text": prompt + " and more"})
    assert again.status == 200
    assert sum(p.stats.generation_requests for p in prefills) == 3 and d.stats.generation_requests >= 2
    assert {tuple(sorted(b)) for b in d.stats.bootstrap} == {("bootstrap_host", "bootstrap_port", "bootstrap_room")}
    # the retry was routed by the prompt: cache_aware counted it (owner found, then avoided)
    decisions = dict(re.findall(r'smg_cache_aware_decisions_total\{decision="(\w+)",[^}]*worker_type="prefill"\} '
                                r'(\S+)', g.metrics()))
    assert (float(decisions["miss"]), float(decisions["hit"])) == (1, 2)


def test_logprobs_are_merged(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill")
    (d,) = fake_workers(1, role="decode", stream_chunks=3)
    g = pd_gateway(gateway, [p], [d])
    r = g.post("/generate", {"text": "x", "return_logprob": True})
    assert r.status == 200
    lp = r.json()["meta_info"]["input_token_logprobs"]
    assert [t[2] for t in lp] == ["prefill-in", "decode-in"]
    r = g.post("/generate", {"text": "x", "return_logprob": True, "stream": True})
    events = [json.loads(l[6:]) for l in r.body.decode().split("\n\n") if l.startswith("data: {")]
    assert len(events) == 3
    assert all([t[2] for t in e["meta_info"]["input_token_logprobs"]] == ["prefill-in", "decode-in"] for e in events)
    r = g.post("/generate", {"text": ["a", "b"], "return_logprob": True})
    assert all([t[2] for t in item["meta_info"]["input_token_logprobs"]] == ["prefill-in", "decode-in"]
               for item in r.json())


def test_chat_and_completions_in_pd_mode(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill")
    (d,) = fake_workers(1, role="decode")
    g = pd_gateway(gateway, [p], [d])
    r = g.post("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200 and r.json()["worker"] == d.name
    r = g.post("/v1/completions", {"model": "fake-model", "prompt": ["a", "b"]})
    assert r.status == 200
    assert len(d.stats.bootstrap[-1]["bootstrap_room"]) == 2


def test_readiness_and_models_in_pd_mode(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill")
    g = gateway(["--pd-disaggregation", "--prefill", p.url], wait_workers=1)
    r = g.get("/readiness")
    assert r.status == 503 and r.json()["reason"] == "insufficient healthy workers"
    assert g.post("/generate", {"text": "x"}).status == 503
    (d,) = fake_workers(1, role="decode")
    assert g.post("/workers", {"url": d.url, "worker_type": "decode"}).status == 202
    wait_for(lambda: g.get("/readiness").status == 200, message="ready with both sides")
    assert g.get("/v1/models").json()["data"][0]["id"] == "fake-model"
    assert g.get("/get_server_info").json()["worker"] == d.name
    assert g.post("/generate", {"text": "x"}).status == 200


def test_discovered_pd_pods_serve_traffic(k8s, pod_workers, gateway):
    port, (pf, dc) = pod_workers(2)
    pf.set(role="prefill")
    dc.set(role="decode")
    k8s.add(make_pod("prefill-0", pf.host, {"app": "sglang", "role": "prefill"},
                     annotations={"sglang.ai/bootstrap-port": "8998"}))
    k8s.add(make_pod("decode-0", dc.host, {"app": "sglang", "role": "decode"}))
    g = gateway(["--service-discovery", "--pd-disaggregation", "--prefill-selector", "app=sglang", "role=prefill",
                 "--decode-selector", "app=sglang", "role=decode", "--service-discovery-namespace", "inference",
                 "--service-discovery-port", str(port)], env=k8s.env)
    wait_for(lambda: g.get("/readiness").status == 200, message="PD ready")
    for i in range(3):
        r = g.post("/generate", {"text": f"x{i}", "stream": i == 2})
        assert r.status == 200
    assert [b["bootstrap_port"] for b in dc.stats.bootstrap] == [8998] * 3
    assert all(b["bootstrap_host"] == pf.host for b in dc.stats.bootstrap)
    wait_for(lambda: len(pf.stats.bootstrap) == 3, message="prefill got all 3")
    assert pf.stats.bootstrap == dc.stats.bootstrap


def test_decode_held_for_logprobs_is_bounded(fake_workers, gateway):
    """With return_logprob, decode's stream waits for prefill's logprobs; the
    gateway holds 128 KB of it and stops reading the decode worker until
    prefill answers, instead of buffering the whole answer."""
    (p,) = fake_workers(1, role="prefill", response_delay=3.0)
    # each event carries the logprobs of every token so far: ~70 MB in all
    (d,) = fake_workers(1, role="decode", stream_chunks=2000)
    g = pd_gateway(gateway, [p], [d])
    base = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{g.proc.pid}/status").read()).group(1))
    body = json.dumps({"text": "x", "stream": True, "return_logprob": True}).encode()
    s = socket.create_connection(("127.0.0.1", g.port), timeout=60)
    peak = 0
    with s:
        s.sendall(post_raw("/generate", body))
        wait_for(lambda: p.stats.in_flight == 1, message="prefill working on the request")
        while p.stats.in_flight == 1:
            rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{g.proc.pid}/status").read()).group(1))
            peak = max(peak, rss - base)
            time.sleep(0.05)
        data = read_until_close_or_end(s)
    assert peak < 32 * 1024, f"{peak} kB held while prefill was answering"
    events = re.findall(rb"data: (.*?)\n\n", data)
    assert len(events) == 2001 and events[-1] == b"[DONE]"
    # prefill's input logprobs lead the merged stream
    assert json.loads(events[0])["meta_info"]["input_token_logprobs"][0][2] == "prefill-in"


def read_until_close_or_end(s) -> bytes:
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return data


def test_worker_connections_are_reused_across_pd_requests(fake_workers, gateway):
    """Decode may end before prefill's answer is fully read: the rest of it
    is read and dropped, and the connection goes back to the pool instead
    of being closed (a new connection per request would cost a handshake
    on every prefill)."""
    (p,) = fake_workers(1, role="prefill")
    (d,) = fake_workers(1, role="decode")
    g = pd_gateway(gateway, [p], [d])
    for i in range(120):
        r = request(g.port, "POST", "/generate", {"text": f"hello {i}"})
        assert r.status == 200
    wait_for(lambda: p.stats.in_flight == 0, message="prefill idle")
    # a prefill leg still finishing when the next request starts needs a
    # second connection now and then; closing them would need one per request
    assert p.stats.connections <= 20, p.stats.connections
    assert d.stats.connections <= 20, d.stats.connections


def test_a_prefill_answer_nobody_needs_is_read_until_the_deadline_at_most(fake_workers, gateway):
    """Decode's answer has ended, prefill's goes on: the gateway keeps
    reading (and dropping) it to reuse the connection, but stops at the
    request's deadline; an answer that never ends holds nothing after it."""
    (p,) = fake_workers(1, role="prefill", stream_chunks=1000, stream_interval=0.05)
    (d,) = fake_workers(1, role="decode", stream_chunks=2)
    g = pd_gateway(gateway, [p], [d], "--request-timeout-secs", "2")
    t0 = time.monotonic()
    r = g.post("/generate", {"text": "x", "stream": True})
    assert r.status == 200 and b"data: [DONE]" in r.body
    loads = lambda: {w["url"]: w["load"] for w in g.workers()}
    assert loads()[p.url] == 1  # prefill still streams (50 s in all)
    wait_for(lambda: loads()[p.url] == 0, timeout=10, message="the prefill leg stopped")
    assert time.monotonic() - t0 >= 1.8
    wait_for(lambda: p.stats.in_flight == 0, message="the prefill worker saw the connection close")


def test_a_prefill_leg_still_waiting_for_its_connection_is_sent_after_decode_answers(fake_workers, gateway):
    """Decode can answer while prefill's leg waits for a connection (here the
    only one, --max-connections-per-worker 1, is busy with a slow prefill):
    that leg is still sent when the connection frees, as the reference
    dispatches both sides of every request."""
    (p,) = fake_workers(1, role="prefill", response_delay=0.5)
    (d,) = fake_workers(1, role="decode")
    g = pd_gateway(gateway, [p], [d], "--max-connections-per-worker", "1")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda i: request(g.port, "POST", "/generate", {"text": f"x{i}"}), range(2)))
    assert [r.status for r in answers] == [200, 200]
    assert d.stats.generation_requests == 2
    wait_for(lambda: p.stats.generation_requests == 2, message="the waiting prefill leg sent")
    wait_for(lambda: p.stats.in_flight == 0 and {w["url"]: w["load"] for w in g.workers()}[p.url] == 0,
             message="both prefill legs ended")
    assert len(p.stats.bootstrap) == 2


def test_prefill_admission_limits_in_flight_requests_per_prefill_worker(fake_workers, gateway):
    """--prefill-max-inflight-requests-per-worker 1: prefill's answer holds
    the slot (after decode has answered the client); the next requests wait
    in the prefill queue, and one beyond --prefill-queue-size is refused."""
    import concurrent.futures

    (p,) = fake_workers(1, role="prefill", response_delay=0.5)
    (d,) = fake_workers(1, role="decode")
    g = pd_gateway(gateway, [p], [d], "--prefill-max-inflight-requests-per-worker", "1",
                   "--prefill-queue-size", "2")
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda i: g.post("/generate", {"text": f"q{i}"}, timeout=20), range(4)))
    assert sorted(r.status for r in results) == [200, 200, 200, 429]
    refused = next(r for r in results if r.status == 429)
    assert refused.json()["error"]["code"] == "prefill_queue_full" and refused.headers["retry-after"] == "1"
    wait_for(lambda: p.stats.completed == 3, message="three prefills")
    assert p.stats.max_in_flight == 1
    assert d.stats.completed == 3


def test_a_request_waits_for_a_prefill_slot_at_most_the_queue_timeout(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill", response_delay=3.0)
    (d,) = fake_workers(1, role="decode")
    g = pd_gateway(gateway, [p], [d], "--prefill-max-inflight-requests-per-worker", "1",
                   "--prefill-queue-timeout-secs", "0.5")
    assert g.post("/generate", {"text": "holds the slot for 3 s"}).status == 200
    started = time.monotonic()
    r = g.post("/generate", {"text": "waits"})
    waited = time.monotonic() - started
    assert r.status == 429 and r.json()["error"]["code"] == "prefill_queue_timeout"
    assert waited < 2.5  # answered by the queue's timeout, not by the slot freeing
    assert d.stats.completed == 1
    # with no queue, a request finding the limit reached is refused at once
    g2 = pd_gateway(gateway, [p], [d], "--prefill-max-inflight-requests-per-worker", "1",
                    "--prefill-queue-size", "0")
    assert g2.post("/generate", {"text": "holds"}).status == 200
    r = g2.post("/generate", {"text": "refused"})
    assert r.status == 429 and r.json()["error"]["code"] == "prefill_queue_full"

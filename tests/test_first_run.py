"""What a new user and an operator see first: the start-up line, the
security warning, unreachable workers named with the reason, and why a
worker gets no traffic (its circuit breaker, its last error)."""

import time

from helpers import wait_for


def test_an_unreachable_worker_is_reported_within_2_seconds_with_the_reason(gateway, fake_workers):
    started = time.monotonic()
    g = gateway(["--worker-urls", "http://127.0.0.1:1", "http://nonexistent.invalid:8000"])
    wait_for(lambda: "Worker http://127.0.0.1:1 is not reachable yet: connection refused" in g.logs()
             and "Worker http://nonexistent.invalid:8000 is not reachable yet: DNS lookup failed" in g.logs(),
             timeout=5, message="both workers reported")
    assert time.monotonic() - started < 5  # the first report comes after about 1.5 s
    # repeated with backoff, not at every probe
    wait_for(lambda: g.logs().count("http://127.0.0.1:1 is not reachable yet") >= 2, timeout=10,
             message="the report repeated")
    assert g.logs().count("http://127.0.0.1:1 is not reachable yet") <= 3


def test_the_start_up_line_says_what_runs_and_warns_when_open(gateway, fake_workers):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--host", "0.0.0.0", "--policy", "round_robin"], wait_workers=1)
    line = next(l for l in g.logs().splitlines() if "smg.gateway: smg " in l)
    assert "0.0.0.0:" in line and "policy round_robin" in line and "1 static worker" in line
    assert "no API key" in line
    assert "SECURITY: no --api-key while listening on 0.0.0.0" in g.logs()
    g2 = gateway(["--worker-urls", w.url, "--api-key", "k"])
    wait_for(lambda: "API key required" in g2.logs(), message="the start-up line")
    assert "SECURITY" not in g2.logs()
    g3 = gateway(["--worker-urls", w.url])  # the tests' default host is 127.0.0.1: not open
    wait_for(lambda: "no API key" in g3.logs(), message="the start-up line")
    assert "SECURITY" not in g3.logs()


def test_workers_show_their_circuit_breaker_and_last_error(fake_workers, gateway):
    (w,) = fake_workers(1, fail_status=500)
    g = gateway(["--worker-urls", w.url, "--cb-failure-threshold", "2", "--retry-max-retries", "1",
                 "--disable-health-check"], wait_workers=1)
    info = g.workers()[0]
    assert info["circuit_breaker"] == {"state": "closed", "consecutive_failures": 0} and info["last_error"] is None
    assert g.post("/generate", {"text": "a"}).status == 500
    info = g.workers()[0]
    assert info["circuit_breaker"]["consecutive_failures"] == 1
    assert info["last_error"]["message"] == "answered 500 to /generate"
    assert g.post("/generate", {"text": "b"}).status == 500
    info = g.workers()[0]
    assert info["status"] == "ready"  # healthy, and yet:
    assert info["circuit_breaker"]["state"] == "open" and 0 < info["circuit_breaker"]["retry_in_secs"] <= 60
    r = g.post("/generate", {"text": "c"})
    assert r.status == 503 and r.headers["retry-after"] == "1"
    assert "circuit breaker open" in r.json()["error"]["message"]


def test_a_transport_failure_is_the_workers_last_error(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--disable-health-check", "--disable-retries"], wait_workers=1)
    w.stop()
    assert g.post("/generate", {"text": "a"}).status == 500
    error = g.workers()[0]["last_error"]
    assert error["message"].startswith("connect: ") and error["at"].endswith("+00:00")

"""--discovery-provider file: workers follow a JSON manifest."""

import json
import os

import pytest

from helpers import wait_for
from smg.discovery.files import ManifestError, parse_manifest


def write(path, doc):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))
    os.replace(tmp, path)  # as an operator's tooling should: never a half-written file


def urls(g):
    return sorted(w["url"] for w in g.workers() if w["status"] != "draining")


def test_workers_follow_the_manifest(fake_workers, gateway, tmp_path):
    a, b, c = fake_workers(3)
    manifest = tmp_path / "workers.json"
    # the manifest may appear after start-up
    g = gateway(["--discovery-provider", "file", "--discovery-file", str(manifest), "--policy", "round_robin"])
    wait_for(lambda: "does not exist (yet)" in g.logs(), message="the missing manifest reported")
    write(manifest, {"version": 1, "workers": [{"url": a.url}, {"url": b.url, "labels": {"rack": "r1"}}]})
    wait_for(lambda: urls(g) == sorted([a.url, b.url]) and len(g.workers()) == 2 and
             all(w["status"] == "ready" for w in g.workers()), message="a and b ready")
    assert {w["url"]: w["labels"].get("rack") for w in g.workers()}[b.url] == "r1"
    for i in range(4):
        assert g.post("/generate", {"text": f"x{i}"}).status == 200
    # b removed, c added: b drains, c registers
    write(manifest, {"version": 1, "workers": [{"url": a.url}, {"url": c.url, "id": "worker-c"}]})
    wait_for(lambda: sorted(w["url"] for w in g.workers() if w["status"] == "ready") == sorted([a.url, c.url])
             and b.url not in [w["url"] for w in g.workers()], message="b gone, c ready")
    assert any(w["id"] == "worker-c" for w in g.workers())
    served_by_b = b.stats.generation_requests
    for i in range(6):
        assert g.post("/generate", {"text": f"y{i}"}).status == 200
    assert b.stats.generation_requests == served_by_b


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not JSON"),
    ({"workers": []}, '"version" is missing'),
    ({"version": 2, "workers": []}, 'unsupported "version" 2'),
    ({"version": 1, "workers": [{"url": "http://127.0.0.1:1", "weight": 3}]}, "unknown field 'weight'"),
    ({"version": 1, "workers": [{"url": "ftp://x"}]}, "URL must start with http://"),
])
def test_a_malformed_manifest_keeps_the_last_good_fleet(fake_workers, gateway, tmp_path, bad, why):
    (a,) = fake_workers(1)
    manifest = tmp_path / "workers.json"
    write(manifest, {"version": 1, "workers": [{"url": a.url}]})
    g = gateway(["--discovery-provider", "file", "--discovery-file", str(manifest)], wait_workers=1)
    write(manifest, bad)
    wait_for(lambda: "Invalid discovery manifest" in g.logs(), message="the bad manifest reported")
    assert why in g.logs()
    assert urls(g) == [a.url] and g.post("/generate", {"text": "still served"}).status == 200
    # reported once, not at every check
    wait_for(lambda: "smg_discovery_file_errors_total 1.0" in g.metrics(), message="the error counted")
    assert g.logs().count("Invalid discovery manifest") == 1


def test_manifest_fields_and_their_errors():
    ws = parse_manifest(json.dumps({"version": 1, "workers": [
        {"url": "http://10.0.0.1:8000/"},
        {"url": "http://10.0.0.2:8000", "worker_type": "prefill", "bootstrap_port": 8998, "id": "p1",
         "kv_connector": "nixl"},
        {"url": "http://10.0.0.3:8000", "worker_type": "decode", "model_id": "llama", "api_key": "k"},
    ]}).encode())
    assert list(ws) == ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    p = ws["http://10.0.0.2:8000"]
    assert (p.worker_id, p.bootstrap_port, dict(p.labels)) == ("p1", 8998, {"kv_connector": "nixl"})
    assert ws["http://10.0.0.3:8000"].model_id == "llama"
    for doc, why in (({"version": 1, "workers": [{"url": "http://a:1"}, {"url": "http://a:1/"}]}, "listed twice"),
                     ({"version": 1, "workers": [{"url": "http://a:1", "bootstrap_port": 9}]}, "prefill"),
                     ({"version": 1, "workers": [{"url": "http://a:1", "worker_type": "encode"}]}, "worker_type"),
                     ({"version": 1, "workers": {}}, "must be a list"),
                     ({"version": 1, "workers": [], "extra": 1}, "unknown field 'extra'")):
        with pytest.raises(ManifestError, match=why):
            parse_manifest(json.dumps(doc).encode())


def test_file_discovery_flags(capsys):
    from smg.cli import config_from_args

    cfg = config_from_args(["--discovery-provider", "file", "--discovery-file", "/tmp/w.json"])
    assert (cfg.discovery_check_interval_secs, cfg.remove_unhealthy_workers) == (30.0, True)
    assert config_from_args(["--discovery-provider", "kubernetes", "--selector", "app=x"]).service_discovery
    for argv in (["--discovery-provider", "file"], ["--discovery-file", "/tmp/w.json"],
                 ["--discovery-provider", "file", "--discovery-file", "x", "--service-discovery"]):
        with pytest.raises(SystemExit) as e:
            config_from_args(argv)
        assert e.value.code == 2

"""The command line: compatible flags, one-line errors with exit status 2."""

import pytest
from helpers import request, run_cli

from smg.cli import config_from_args


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--port", "notaport"], "--port"),
        (["--port", "70000"], "--port"),
        (["--policy", "fastest"], "--policy"),
        (["--worker-urls", "ftp://x:1"], "URL must start with http://"),
        (["--worker-urls", "http://host:99999"], "invalid port"),
        (["--cache-threshold", "1.5"], "--cache-threshold"),
        (["--balance-rel-threshold", "0.5"], "--balance-rel-threshold"),
        (["--service-discovery"], "--service-discovery needs --selector"),
        (["--service-discovery", "--pd-disaggregation", "--prefill-selector", "role=prefill"],
         "--prefill-selector and --decode-selector"),
        (["--service-discovery", "--selector", "=sglang"], "bad --selector item"),
        (["--service-discovery", "--selector", "app in ()"], "bad --selector item"),
        (["--prefill", "http://p:1", "9000"], "need --pd-disaggregation"),
        (["--pd-disaggregation", "--prefill", "http://p:1", "notaport"], "bootstrap port"),
        (["--selector", "app=x"], "need --service-discovery"),
        (["--max-payload-size", "0"], "--max-payload-size"),
        (["--request-timeout-secs", "-1"], "--request-timeout-secs"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, fragment):
    r = run_cli(args)
    assert r.returncode == 2, r
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("smg: error:"), lines
    assert fragment in lines[0]


def test_help_lists_reference_flags():
    r = run_cli(["--help"])
    assert r.returncode == 0
    for flag in ("--worker-urls", "--policy", "--cache-threshold", "--service-discovery", "--selector",
                 "--prefill-selector", "--decode-selector", "--service-discovery-namespace",
                 "--service-discovery-port", "--health-check-interval-secs", "--cb-failure-threshold",
                 "--retry-max-retries", "--prometheus-port", "--log-level", "--api-key",
                 "--shutdown-grace-period-secs", "--max-payload-size", "--request-timeout-secs"):
        assert flag in r.stdout, flag


def test_defaults_match_the_reference():
    cfg = config_from_args([])
    assert (cfg.host, cfg.port) == ("0.0.0.0", 30000)
    assert cfg.policy == "cache_aware"
    assert cfg.cache_threshold == 0.3
    assert (cfg.balance_abs_threshold, cfg.balance_rel_threshold) == (64, 1.5)
    assert cfg.eviction_interval_secs == 60 and cfg.max_tree_size == 67108864
    assert cfg.service_discovery_port == 80 and cfg.service_discovery_namespace is None
    assert (cfg.health_check_interval_secs, cfg.health_check_timeout_secs) == (60, 5)
    assert (cfg.health_failure_threshold, cfg.health_success_threshold) == (3, 2)
    assert cfg.health_check_endpoint == "/health"
    assert (cfg.cb_failure_threshold, cfg.cb_success_threshold, cfg.cb_timeout_duration_secs) == (10, 3, 60)
    assert cfg.retry_max_retries == 5 and cfg.max_attempts == 5
    assert (cfg.retry_initial_backoff_ms, cfg.retry_max_backoff_ms) == (50, 30000)
    assert (cfg.retry_backoff_multiplier, cfg.retry_jitter_factor) == (1.5, 0.2)
    assert cfg.worker_startup_timeout_secs == 1800 and cfg.request_timeout_secs == 1800
    assert cfg.max_payload_size == 536870912
    assert (cfg.prometheus_host, cfg.prometheus_port) == ("0.0.0.0", 29000)
    assert cfg.log_level == "info" and cfg.shutdown_grace_period_secs == 180


def test_disable_retries_means_one_attempt():
    assert config_from_args(["--disable-retries"]).max_attempts == 1


def test_prefill_bootstrap_ports():
    cfg = config_from_args(["--pd-disaggregation", "--prefill", "http://p1:8000", "9000",
                            "--prefill", "http://p2:8000", "none", "--prefill", "http://p3:8000",
                            "--decode", "http://d1:8000", "--decode", "http://d2:8000"])
    assert [(p.url, p.bootstrap_port) for p in cfg.prefill] == [
        ("http://p1:8000", 9000), ("http://p2:8000", None), ("http://p3:8000", None)]
    assert cfg.decode == ["http://d1:8000", "http://d2:8000"]


def test_selectors_accept_kubernetes_syntax():
    cfg = config_from_args(["--service-discovery", "--selector", "app=sglang", "env in (prod,staging)",
                            "tier!=cpu", "!canary", "gpu"])
    assert cfg.selector == ["app=sglang", "env in (prod,staging)", "tier!=cpu", "!canary", "gpu"]


def test_launch_subcommand_spelling(fake_workers):
    """`smg launch ...` (the reference's spelling) starts the same gateway."""
    from helpers import GatewayProcess

    (w,) = fake_workers(1)
    with GatewayProcess(["--worker-urls", w.url], subcommand="launch") as g:
        g.wait_live()
        g.wait_ready_workers(1)
        assert request(g.port, "POST", "/generate", {"text": "hi"}).status == 200

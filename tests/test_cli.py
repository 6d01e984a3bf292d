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
        (["--cors-allowed-origins", "*", "http://a.example"], "'*' stands alone"),
        (["--cors-allowed-origins", "a.example"], "is not an origin"),
        (["--health-check-port", "30000"], "--health-check-port must differ"),
        (["--model-alias", "gpt4"], "--model-alias takes ALIAS=MODEL"),
        (["--model-alias", "a=m1", "--model-alias", "a=m2"], "given for two models"),
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
    assert cfg.cb_window_duration_secs == 120
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


# --- the reference's whole flag list -------------------------------------------

import os  # noqa: E402

from smg.cli import build_parser  # noqa: E402
from smg.reference_flags import all_groups  # noqa: E402

REFERENCE_FLAGS = [line.strip() for line in open(os.path.join(os.path.dirname(__file__), "data",
                                                               "reference_flags.txt"))
                   if line.startswith("--")]
REGISTRY = [(kind, group, names, nargs) for kind, group in all_groups() for names, nargs in group.flags]


def test_every_reference_flag_parses():
    """A launch line written for the reference never fails with
    'unrecognized arguments': every option of its `smg launch --help`
    (aliases included) is an option here."""
    known = set(build_parser()._option_string_actions)
    assert len(REFERENCE_FLAGS) > 200
    assert [f for f in REFERENCE_FLAGS if f not in known] == []


def _argv(flag, nargs, value="some-value"):
    return [flag] if nargs == 0 else [flag, value]


@pytest.mark.parametrize("kind, group, names, nargs",
                         [r for r in REGISTRY if r[0] != "no effect"], ids=lambda r: str(r) if isinstance(r, str) else "")
def test_a_reference_feature_smg_lacks_exits_2_naming_flag_and_feature(kind, group, names, nargs, capsys):
    for flag in names:
        with pytest.raises(SystemExit) as e:
            # a flag after it is not swallowed: the error is about this one
            config_from_args(_argv(flag, nargs) + ["--worker-urls", "http://127.0.0.1:8000"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"smg: error: {names[0]}: {kind}: {group.feature}", err


@pytest.mark.parametrize("kind, group, names, nargs", [r for r in REGISTRY if r[0] == "no effect"])
def test_reference_flags_for_machinery_smg_lacks_are_accepted_and_noted(kind, group, names, nargs):
    value = (group.accepted or {}).get(names[0], ("some-value",))[0]
    cfg = config_from_args(_argv(names[0], nargs, value))
    assert cfg.startup_notices == [f"{names[0]} has no effect: {group.feature}"]


def test_a_no_effect_flag_with_a_value_smg_cannot_honour_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(["--backend", "openai"])
    assert e.value.code == 2
    assert "--backend openai: not supported (smg accepts sglang, vllm)" in capsys.readouterr().err


def test_reference_policies_parse_and_bucket_is_for_prefill_only(capsys):
    cfg = config_from_args(["--policy", "passthrough", "--pd-disaggregation", "--prefill-policy", "bucket",
                            "--bucket-adjust-interval-secs", "2"])
    assert (cfg.policy, cfg.prefill_policy, cfg.bucket_adjust_interval_secs) == ("passthrough", "bucket", 2.0)
    for flag in ("--policy", "--decode-policy"):
        with pytest.raises(SystemExit) as e:
            config_from_args([flag, "bucket"])
        assert e.value.code == 2
        assert "invalid choice: 'bucket'" in capsys.readouterr().err


def test_list_flags_accumulate_when_repeated():
    cfg = config_from_args(["--worker-urls", "http://a:1", "--worker-urls", "http://b:1", "http://c:1"])
    assert cfg.worker_urls == ["http://a:1", "http://b:1", "http://c:1"]
    cfg = config_from_args(["--service-discovery", "--selector", "app=x", "--selector", "tier=gpu"])
    assert cfg.selector == ["app=x", "tier=gpu"]
    cfg = config_from_args(["--service-discovery", "--pd-disaggregation", "--prefill-selector", "app=x",
                            "--prefill-selector", "role=prefill", "--decode-selector", "app=x",
                            "--decode-selector", "role=decode"])
    assert cfg.prefill_selector == ["app=x", "role=prefill"] and cfg.decode_selector == ["app=x", "role=decode"]


@pytest.mark.parametrize("args, expected", [
    ([], False),
    (["--service-discovery", "--selector", "a=b"], True),
    (["--service-discovery", "--selector", "a=b", "--no-remove-unhealthy-workers"], False),
    (["--service-discovery", "--selector", "a=b", "--no-worker-auto-recovery"], False),
    (["--remove-unhealthy-workers"], True),
    (["--worker-auto-recovery"], True),
])
def test_removing_unhealthy_workers_defaults_to_discovery(args, expected):
    assert config_from_args(args).remove_unhealthy_workers is expected


def test_no_effect_flags_are_logged_at_start_up(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--disable-tokenizer-autoload", "--backend", "sglang"], wait_workers=1)
    assert ("--disable-tokenizer-autoload has no effect: smg loads a tokenizer only from a local --tokenizer-path "
            "or --model-path") in g.logs()
    assert "--backend has no effect" in g.logs()


def test_help_describes_every_flag_with_its_default():
    import argparse

    from smg.cli import build_parser

    p = build_parser()
    text = p.format_help()
    for action in p._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, action.option_strings[0]
        assert action.option_strings[0] in text
    assert "(default: 30000)" in text and "--version" in text


def test_bad_values_never_show_python_type_names(capsys):
    import argparse

    from smg.cli import build_parser

    typed = [a for a in build_parser()._actions
             if a.option_strings and callable(a.type) and a.nargs in (None, "?") and a.help != argparse.SUPPRESS]
    assert len(typed) > 30
    for action in typed:
        with pytest.raises(SystemExit) as e:
            config_from_args([action.option_strings[0], "not-a-number"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("smg: error: argument"), (action.option_strings, err)
        assert "invalid" not in err and "_" not in err.split(":", 2)[2].split("got")[0], err

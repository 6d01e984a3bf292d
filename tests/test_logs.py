"""Logging: --log-level, --log-json, --log-dir and RUST_LOG-style filters."""

import json
import logging

import pytest
from helpers import wait_for

from smg import logs


def test_parse_rust_log():
    assert logs.parse_rust_log("smg::discovery=debug") == (None, {"smg.discovery": logging.DEBUG})
    assert logs.parse_rust_log("warn,smg::health=trace") == (logging.WARNING, {"smg.health": logging.DEBUG})
    assert logs.parse_rust_log("info, smg=error ,") == (logging.INFO, {"smg": logging.ERROR})
    with pytest.raises(ValueError):
        logs.parse_rust_log("smg=loud")


def test_rust_log_turns_on_debug_for_one_module_only():
    logs.setup("info", rust_log="smg::discovery=debug")
    try:
        assert logging.getLogger("smg.discovery").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("smg.discovery.kubernetes").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("smg.health").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("smg.health").isEnabledFor(logging.INFO)
    finally:
        logging.getLogger("smg.discovery").setLevel(logging.NOTSET)
        logs.setup("info", rust_log="")


def test_log_json_and_log_dir(fake_workers, gateway, tmp_path):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--log-json", "--log-dir", str(tmp_path)], wait_workers=1)
    path = tmp_path / "smg.log"
    wait_for(lambda: path.exists() and "Registered worker" in path.read_text(), message="log file")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    reg = [r for r in records if r["message"] == f"Registered worker: {w.url}"]
    assert reg and reg[0]["level"] == "INFO" and reg[0]["target"] == "smg.workers"
    assert set(reg[0]) >= {"timestamp", "level", "target", "message"}
    # stderr gets the same JSON lines
    assert any(line.startswith("{") and "Registered worker" in line for line in g.logs().splitlines())


def test_debug_level_from_flag_and_env(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--log-level", "warn"], env={"RUST_LOG": "smg::workers=info"},
                wait_workers=1)
    wait_for(lambda: "[INFO] smg.workers: Registered worker" in g.logs(), message="module info line")
    assert "[INFO] smg.gateway" not in g.logs()  # other modules stay at warn

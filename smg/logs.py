"""Logging: --log-level, --log-json, --log-dir, and RUST_LOG-style filters.

RUST_LOG holds comma-separated directives, as the reference gateway reads
them: a bare level sets the default (`RUST_LOG=debug`), `target=level` sets
one module (`RUST_LOG=smg::discovery=debug` turns on debug logging for the
`smg.discovery` logger and its children only)."""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
import sys
from typing import Optional

import orjson

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": logging.CRITICAL + 10,
}
_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN", logging.ERROR: "ERROR",
          logging.CRITICAL: "ERROR"}


def parse_level(name: str) -> int:
    try:
        return _LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}") from None


def parse_rust_log(spec: str) -> tuple[Optional[int], dict[str, int]]:
    """'info,smg::discovery=debug' -> (INFO, {'smg.discovery': DEBUG}).
    Unknown levels raise ValueError."""
    default: Optional[int] = None
    targets: dict[str, int] = {}
    for directive in spec.split(","):
        directive = directive.strip()
        if not directive:
            continue
        if "=" in directive:
            target, _, level = directive.partition("=")
            targets[target.strip().replace("::", ".")] = parse_level(level)
        elif directive.lower() in _LEVELS:
            default = parse_level(directive)
        else:  # a bare target means "everything from it"
            targets[directive.replace("::", ".")] = logging.DEBUG
    return default, targets


class TextFormatter(logging.Formatter):
    """`2026-11-26T18:16:35.123Z [INFO] smg.discovery: message`"""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line = f"{ts:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z [{_NAMES.get(record.levelno, record.levelname)}] {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out = {
            "timestamp": f"{ts:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z",
            "level": _NAMES.get(record.levelno, record.levelname),
            "target": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def setup(level: str = "info", json: bool = False, log_dir: Optional[str] = None,
          rust_log: Optional[str] = None, file_name: str = "smg.log") -> None:
    """`file_name`: the file in log_dir (each process of --workers N writes
    its own: rotating one file from several processes loses lines)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter: logging.Formatter = JsonFormatter() if json else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(logging.handlers.TimedRotatingFileHandler(
            os.path.join(log_dir, file_name), when="midnight", backupCount=7, utc=True))
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    default = parse_level(level)
    targets: dict[str, int] = {}
    if rust_log is None:
        rust_log = os.environ.get("RUST_LOG")
    if rust_log:
        env_default, targets = parse_rust_log(rust_log)
        if env_default is not None:
            default = env_default
    root.setLevel(default)
    # third-party chatter stays at WARN unless asked for
    for noisy in ("kubernetes", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(max(default, logging.WARNING))
    for target, lvl in targets.items():
        logging.getLogger(target).setLevel(lvl)

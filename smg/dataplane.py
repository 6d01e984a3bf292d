"""A data-plane process of --workers N.

The supervisor (smg.supervisor) starts it as `python -m smg.dataplane` with
the listening sockets of its slot and one end of a control channel, and the
settings in $SMG_DATAPLANE. It serves the proxied routes from its own
router and cache-aware trees, keeps a mirror of the control plane's worker
registry (the worker records the control plane sends), and forwards the
routes the control plane answers (admin, /readiness, /v1/models, ...). It
drains a worker when told to and says when its last request there ended.
It stops gracefully on SIGTERM, on a "stop" message, or when the control
plane goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
from time import monotonic
from typing import Optional

import orjson
import uvloop

from smg import logs
from smg._fast.request import Request, map_large_allocations
from smg._fast.routes import Response, error_response, text_response
from smg.config import Config, PrefillSpec
from smg.gateway import TICK_SECONDS, DataPlane, build_router, raise_fd_limit
from smg.ipc import Channel, forwarded_request, response_of
from smg.metrics import dataplane_snapshot
from smg.workers import Registry

log = logging.getLogger("smg.dataplane")

ENV = "SMG_DATAPLANE"
# answered here: whether this process is alive is this process's business
LOCAL_ROUTES = frozenset(["/health", "/liveness"])


def config_to_json(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_json(values: dict) -> Config:
    values = dict(values)
    values["prefill"] = [PrefillSpec(**p) for p in values.get("prefill", [])]
    return Config(**values)


class DataPlaneProcess:
    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop, index: int):
        self.cfg = cfg
        self.loop = loop
        self.index = index
        self.router = build_router(cfg)
        self.registry = Registry(cfg, self.router, loop, announce=False)
        self.registry.listeners.append(self._on_mirror_event)
        self.data = DataPlane(cfg, loop, self.router, self.registry)
        self.data.add_control_routes(self._handler_for)
        self.channel: Optional[Channel] = None
        self.stopping = asyncio.Event()
        self._tick_handle: Optional[asyncio.TimerHandle] = None

    # --- routes the control plane answers ---

    def _handler_for(self, route_path: str):
        if route_path in LOCAL_ROUTES:
            return lambda req: text_response("OK")

        async def forward(req: Request) -> Response:
            try:
                reply, body = await self.channel.request(*forwarded_request(route_path, req))
            except ConnectionError:
                return error_response(503, "control_plane_unavailable",
                                      "The gateway's control plane is not reachable (shutting down?)")
            return response_of(reply, body)

        return forward

    # --- the control channel ---

    def on_message(self, header: dict, payload: bytes) -> None:
        op = header["op"]
        if op == "worker":
            if self.registry.apply(header["w"]) is None:
                self.channel.send({"op": "drained", "worker": header["w"]["id"]})
        elif op == "sync":
            known = set()
            for rec in header["workers"]:
                known.add(rec["id"])
                self.registry.apply(rec)
            for w in self.registry.all():
                if w.id not in known:
                    self.registry.remove(w, "gone from the control plane")
        elif op == "remove":
            w = self.registry.get(header["worker"])
            if w is not None:
                self.registry.remove(w, "removed by the control plane")
        elif op == "snapshot":
            self.channel.reply(header, {"snapshot": dataplane_snapshot(self.data)})
        elif op == "inflight":
            # what this process knows of each worker: load, circuit breaker, last error
            answer = {"workers": {
                w.id: [w.inflight, w.cb_state, w.cb_failures, w.cb_opened_at, w.last_error, w.last_error_at]
                for w in self.registry.all()}}
            if self.cfg.kv_events:
                from smg.kv_events import streams_of

                answer["kv_events"] = streams_of(self.data.router)
            self.channel.reply(header, answer)
        elif op == "stop":
            self.request_stop()
        else:
            log.warning("control channel: unknown message %r", op)

    def _on_mirror_event(self, event: str, w) -> None:
        # a worker that drained here (or was dropped) has nothing in flight here any more
        if event == "removed" and self.channel is not None:
            self.channel.send({"op": "drained", "worker": w.id})

    def on_channel_lost(self) -> None:
        if not self.stopping.is_set():
            log.warning("data-plane process %d: the control plane went away; stopping", self.index)
            self.request_stop()

    # --- running ---

    def request_stop(self) -> None:
        self.stopping.set()

    def _tick(self) -> None:
        try:
            self.data.tick(monotonic())
        except Exception:
            log.exception("housekeeping tick failed")
        if not self.stopping.is_set() or self.data.core.connections:
            self._tick_handle = self.loop.call_later(TICK_SECONDS, self._tick)

    async def serve(self, control: socket.socket, listening: list[socket.socket]) -> int:
        self.loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        # Ctrl-C reaches the whole process group; the supervisor orchestrates the stop
        self.loop.add_signal_handler(signal.SIGINT, lambda: None)
        if self.data.certificate is not None:  # the supervisor passes SIGHUP on
            self.loop.add_signal_handler(signal.SIGHUP, self.data.certificate.reload, "SIGHUP")
        _, self.channel = await self.loop.create_unix_connection(
            lambda: Channel(self.on_message, self.on_channel_lost), sock=control)
        await self.data.listen(listening)
        self._tick_handle = self.loop.call_later(TICK_SECONDS, self._tick)
        log.debug("data-plane process %d (pid %d) serving", self.index, os.getpid())
        await self.stopping.wait()
        await self.data.drain_requests()
        for w in self.registry.all():
            w.pool.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        return 0


def main() -> None:
    spec = orjson.loads(os.environ[ENV])
    cfg = config_from_json(spec["config"])
    index = spec["index"]
    logs.setup(cfg.log_level, cfg.log_json, cfg.log_dir, file_name=f"smg-dataplane-{index}.log")
    raise_fd_limit()
    map_large_allocations()
    control = socket.socket(fileno=spec["control_fd"])
    listening = [socket.socket(fileno=fd) for fd in spec["listen_fds"]]

    async def run() -> int:
        return await DataPlaneProcess(cfg, asyncio.get_running_loop(), index).serve(control, listening)

    sys.exit(uvloop.run(run()))


if __name__ == "__main__":
    main()

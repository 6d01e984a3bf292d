"""--workers N: one control plane, N data-plane processes on one port.

The main process runs the control plane (registry, registration, health
checks, Kubernetes discovery, admin, /metrics) and supervises N data-plane
processes (smg.dataplane). Each data-plane slot has its own listening
socket on the same address (SO_REUSEPORT: the kernel spreads connections
over them). The supervisor creates those sockets and keeps them open, so a
slot's queued connections survive its process: when a data-plane process
dies, it is logged and started again on the same sockets, and the
connections waiting there are served by its successor.

Every change to the worker set is pushed to every data-plane process as a
worker record, in order, over its control channel; a new process first gets
the whole set. Requests for the routes the control plane answers come in
over the same channel. /metrics asks each process for its counters and adds
them up. Removing a worker waits until every process has drained it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from time import monotonic
from typing import Optional

import orjson

from smg._fast.worker import CB_SEVERITY, Worker
from smg.config import Config
from smg.dataplane import ENV, config_to_json
from smg.gateway import TICK_SECONDS, ControlPlane, build_router, log_startup, sock_address
from smg.ipc import Channel, request_of, response_header
from smg.metrics import merge_snapshots
from smg.workers import Registry

log = logging.getLogger("smg.supervisor")

SNAPSHOT_TIMEOUT = 2.0
# a process that dies this soon after starting is restarted after a backoff
QUICK_DEATH_SECS = 5.0
MAX_RESTART_BACKOFF = 30.0


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU
    quota (a container's `resources.limits.cpu`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, int(-(-quota // 1))))
    return max(1, cpus)


def _cgroup_cpu_quota() -> Optional[float]:
    try:  # cgroup v2
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def listening_sockets(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """`count` sets of SO_REUSEPORT sockets bound to host:port (one per
    address family that host resolves to), listening."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    families = {info[0] for info in infos}
    slots: list[list[socket.socket]] = []
    for _ in range(count):
        socks = []
        for family, type_, proto, _, addr in dict.fromkeys((i[0], i[1], i[2], i[3], i[4]) for i in infos):
            s = socket.socket(family, type_, proto)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6 and len(families) > 1:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and slots:  # the port the first slot was given
                    addr = (addr[0], slots[0][0].getsockname()[1], *addr[2:])
                s.bind(addr)
                s.listen(4096)
                s.setblocking(False)
            except OSError:
                s.close()
                for socks_ in slots + [socks]:
                    for other in socks_:
                        other.close()
                raise
            socks.append(s)
        slots.append(socks)
    return slots


class Slot:
    """One data-plane process's place: its sockets, and the process now in it."""

    def __init__(self, index: int, sockets: list[socket.socket]):
        self.index = index
        self.sockets = sockets
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.channel: Optional[Channel] = None
        self.started = 0.0
        self.restarts = 0
        self.quick_deaths = 0   # in a row: each died within QUICK_DEATH_SECS
        self.requests = 0   # in the last snapshot

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.channel is not None \
            and not self.channel.closed


class Supervisor:
    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.loop = loop
        # the registry keeps a router in step; no request is routed here
        self.registry = Registry(cfg, build_router(cfg, kv_events=False), loop)
        self.registry.wait_idle = self._wait_drained
        self.registry.listeners.append(self._on_worker_event)
        self.control = ControlPlane(cfg, loop, self.registry, self._snapshot, processes=self._process_info,
                                    inflight_source=self._inflight)
        self.slots: list[Slot] = []
        # worker id -> slots that still have to drain it
        self.draining: dict[str, set[int]] = {}
        self.drain_changed = asyncio.Event()
        self.stopping = asyncio.Event()
        self._tick_handle: Optional[asyncio.TimerHandle] = None

    # --- data-plane processes ---

    async def _spawn(self, slot: Slot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = {"index": slot.index, "control_fd": theirs.fileno(),
                "listen_fds": [s.fileno() for s in slot.sockets], "config": config_to_json(self.cfg)}
        env = {**os.environ, ENV: orjson.dumps(spec).decode()}
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "smg.dataplane", env=env, stdin=asyncio.subprocess.DEVNULL,
                pass_fds=[theirs.fileno(), *spec["listen_fds"]])
        finally:
            theirs.close()
        slot.started = monotonic()
        _, slot.channel = await self.loop.create_unix_connection(
            lambda: Channel(lambda h, p: self._on_message(slot, h, p)), sock=ours)
        slot.channel.send({"op": "sync", "workers": [Registry.record(w) for w in self.registry.all()]})
        log.debug("data-plane process %d started (pid %d)", slot.index, slot.proc.pid)
        self.loop.create_task(self._watch(slot, slot.proc))

    async def _watch(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if slot.channel is not None:
            slot.channel.transport.close()
        self._forget_drains(slot.index)
        if self.stopping.is_set():
            return
        how = f"signal {-code}" if code < 0 else f"status {code}"
        log.error("data-plane process %d (pid %d) exited with %s; starting it again", slot.index, proc.pid, how)
        slot.restarts += 1
        # connections wait in the slot's socket meanwhile: restart at once,
        # unless the process keeps dying young (then back off, up to 30 s)
        slot.quick_deaths = slot.quick_deaths + 1 if monotonic() - slot.started < QUICK_DEATH_SECS else 0
        if slot.quick_deaths > 1:
            await asyncio.sleep(min(MAX_RESTART_BACKOFF, 0.5 * 2 ** (slot.quick_deaths - 2)))
        if not self.stopping.is_set():
            try:
                await self._spawn(slot)
            except OSError as e:
                log.error("could not start data-plane process %d: %s", slot.index, e)

    def _on_message(self, slot: Slot, header: dict, payload: bytes) -> None:
        op = header["op"]
        if op == "http":
            self.loop.create_task(self._serve_forwarded(slot.channel, header, payload))
        elif op == "drained":
            pending = self.draining.get(header["worker"])
            if pending is not None:
                pending.discard(slot.index)
                self.drain_changed.set()
        else:
            log.warning("control channel: unknown message %r from process %d", op, slot.index)

    async def _serve_forwarded(self, channel: Channel, header: dict, body: bytes) -> None:
        """A request for a control route that reached a data-plane process."""
        try:
            resp = self.control.handlers[header["route"]](request_of(header, body))
            if asyncio.iscoroutine(resp):
                resp = await resp
            channel.reply(header, response_header(resp), resp.body)
        except Exception as e:
            log.error("handler for %s failed: %r", header["path"], e, exc_info=True)
            from smg._fast.routes import error_body

            channel.reply(header, {"status": 500, "content_type": "application/json",
                                   "headers": "x-smg-error-code: internal_error\r\n", "error_code": "internal_error"},
                          error_body(500, "internal_error", "internal error"))

    def _broadcast(self, header: dict) -> None:
        for slot in self.slots:
            if slot.alive:
                slot.channel.send(header)

    def _on_worker_event(self, event: str, w: Worker) -> None:
        if event == "removed":
            self.draining.pop(w.id, None)
            self._broadcast({"op": "remove", "worker": w.id})
            return
        if event == "draining":
            self.draining[w.id] = {s.index for s in self.slots if s.alive}
        self._broadcast({"op": "worker", "w": Registry.record(w)})

    async def _wait_drained(self, w: Worker, deadline: float) -> None:
        pending = self.draining.get(w.id)
        while pending and self.loop.time() < deadline:
            self.drain_changed.clear()
            try:
                await asyncio.wait_for(self.drain_changed.wait(), deadline - self.loop.time())
            except asyncio.TimeoutError:
                break
        if pending:
            log.warning("Worker %s still had requests in flight in %d process(es) after %.0f s; removing it",
                        w.url, len(pending), self.cfg.drain_timeout_secs)

    def _forget_drains(self, index: int) -> None:
        for pending in self.draining.values():
            pending.discard(index)
        self.drain_changed.set()

    async def _ask_all(self, op: str) -> list[tuple[Slot, dict]]:
        slots = [s for s in self.slots if s.alive]

        async def ask(slot: Slot):
            try:
                header, _ = await asyncio.wait_for(slot.channel.request({"op": op}), SNAPSHOT_TIMEOUT)
                return slot, header
            except (ConnectionError, asyncio.TimeoutError):
                return slot, None

        return [(s, h) for s, h in await asyncio.gather(*(ask(s) for s in slots)) if h is not None]

    async def _snapshot(self) -> dict:
        answers = await self._ask_all("snapshot")
        for slot, header in answers:
            slot.requests = header["snapshot"]["requests"]
        return merge_snapshots([h["snapshot"] for _, h in answers])

    async def _inflight(self) -> dict:
        """Per worker id, over the data-plane processes: the requests in flight
        (summed), the circuit breaker that has failed most (open before
        half-open before closed; each process has its own), the latest error."""
        merged: dict[str, list] = {}
        streams: dict[str, dict] = {}
        answers = await self._ask_all("inflight")
        for _, header in answers:
            for wid, stream in header.get("kv_events", {}).items():
                # one view per process; shown: the first, unless another's stream is not live
                if wid not in streams or stream["state"] != "live":
                    streams[wid] = stream
        if self.cfg.kv_events:
            self.registry.kv_event_streams = lambda: streams
        for _, header in answers:
            for wid, (inflight, cb_state, cb_failures, cb_opened_at, error, error_at) in header["workers"].items():
                m = merged.get(wid)
                if m is None:
                    merged[wid] = [inflight, cb_state, cb_failures, cb_opened_at, error, error_at]
                    continue
                m[0] += inflight
                if (CB_SEVERITY[cb_state], cb_failures) > (CB_SEVERITY[m[1]], m[2]):
                    m[1:4] = [cb_state, cb_failures, cb_opened_at]
                if error is not None and error_at > m[5]:
                    m[4:6] = [error, error_at]
        return merged

    def _process_info(self) -> list[dict]:
        return [{"index": s.index, "alive": s.alive, "requests": s.requests, "restarts": s.restarts}
                for s in self.slots]

    # --- running ---

    def _tick(self) -> None:
        now = monotonic()
        try:
            self.control.tick(now)
        except Exception:
            log.exception("housekeeping tick failed")
        if not self.stopping.is_set():
            self._tick_handle = self.loop.call_later(TICK_SECONDS, self._tick)

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("Shutdown requested")
            self.stopping.set()

    def _reload_certificate(self) -> None:
        """SIGHUP: the data-plane processes serve TLS; each reloads its certificate."""
        log.info("SIGHUP: telling the data-plane processes to reload the TLS certificate")
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                slot.proc.send_signal(signal.SIGHUP)

    async def serve(self) -> int:
        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop)
        if cfg.tls_cert_path:
            self.loop.add_signal_handler(signal.SIGHUP, self._reload_certificate)
        try:
            sockets = listening_sockets(cfg.host, cfg.port, cfg.workers)
        except OSError as e:
            log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, e)
            return 1
        self.slots = [Slot(i, socks) for i, socks in enumerate(sockets)]
        log_startup(cfg, [f"{sock_address(sock)} ({cfg.workers} data-plane processes)"
                          for sock in self.slots[0].sockets])
        await self.control.start()
        for slot in self.slots:
            await self._spawn(slot)
        self._tick_handle = self.loop.call_later(TICK_SECONDS, self._tick)
        await self.stopping.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        self.control.shutting_down = True
        # from now on only the data-plane processes hold the listening
        # sockets, and they close them as they start to drain
        for slot in self.slots:
            for s in slot.sockets:
                s.close()
        self._broadcast({"op": "stop"})
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        if procs:
            grace = self.cfg.shutdown_grace_period_secs + 10.0
            done, late = await asyncio.wait([self.loop.create_task(p.wait()) for p in procs], timeout=grace)
            for p in procs:
                if p.returncode is None:
                    log.warning("data-plane process (pid %d) did not stop in time; killing it", p.pid)
                    p.kill()
            if late:
                await asyncio.wait(late, timeout=5.0)
        await self.control.stop()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        log.info("smg stopped")

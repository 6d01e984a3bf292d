"""The channel between the control-plane process and each data-plane
process (--workers N): a Unix socket pair carrying framed messages.

A frame is a 4-byte big-endian length, a 4-byte length of its header, the
header (a JSON object with an "op") and an optional binary payload (an HTTP
body), so bodies travel without base64. Requests that expect an answer carry
an "id"; the answer is a frame with op "reply" and the same id. A request
for a control route (admin API, workers, models) that reaches a data-plane
process travels as op "http" (forwarded_request / request_of) and its
answer back as a reply (response_header / response_of)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from typing import Any, Callable, Optional

import orjson

from smg._fast.request import Request
from smg._fast.routes import Response

log = logging.getLogger("smg.ipc")

_HEAD = struct.Struct(">II")
MAX_FRAME = 1 << 30


class Channel(asyncio.Protocol):
    """One end of the socket pair. `on_message(header, payload)` gets every
    frame that is not a reply; `request()` sends one and awaits its reply."""

    def __init__(self, on_message: Callable[[dict, bytes], Any], on_lost: Optional[Callable[[], None]] = None):
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.closed = False

    # --- asyncio protocol ---

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while len(buf) >= _HEAD.size:
            total, head_len = _HEAD.unpack_from(buf)
            if total > MAX_FRAME or head_len > total:
                log.error("control channel: corrupt frame (%d bytes); closing it", total)
                self.transport.close()
                return
            if len(buf) < _HEAD.size + total:
                break
            start = _HEAD.size
            header = orjson.loads(bytes(buf[start:start + head_len]))
            payload = bytes(buf[start + head_len:start + total])
            del buf[:start + total]
            self._dispatch(header, payload)

    def connection_lost(self, exc) -> None:
        self.closed = True
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("control channel closed"))
        self.waiting.clear()
        if self.on_lost is not None:
            self.on_lost()

    # --- sending ---

    def send(self, header: dict, payload: bytes = b"") -> None:
        if self.closed or self.transport is None:
            return
        head = orjson.dumps(header)
        self.transport.write(_HEAD.pack(len(head) + len(payload), len(head)) + head + payload)

    def request(self, header: dict, payload: bytes = b"") -> asyncio.Future:
        """Send a frame that expects a reply; the future gets (header, payload)."""
        fut = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_exception(ConnectionError("control channel closed"))
            return fut
        msg_id = next(self.ids)
        self.waiting[msg_id] = fut
        self.send({**header, "id": msg_id}, payload)
        return fut

    def reply(self, request: dict, header: dict, payload: bytes = b"") -> None:
        self.send({**header, "op": "reply", "id": request["id"]}, payload)

    def _dispatch(self, header: dict, payload: bytes) -> None:
        if header.get("op") == "reply":
            fut = self.waiting.pop(header.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result((header, payload))
            return
        try:
            self.on_message(header, payload)
        except Exception:
            log.exception("control channel: handling %r failed", header.get("op"))


# --- a control route's request, forwarded from a data-plane process ---

def forwarded_request(route_path: str, req: Request) -> tuple[dict, bytes]:
    """The frame (header, payload) of a request for a control route that
    reached a data-plane process (op "http")."""
    header = {"op": "http", "route": route_path, "method": req.method.decode("latin-1"),
              "path": req.path, "query": req.query.decode("latin-1"),
              # routes that ask workers on the client's behalf pass its credentials on
              "authorization": req.authorization.decode("latin-1") if req.authorization else None}
    return header, req.body or b""


def request_of(header: dict, payload: bytes) -> Request:
    """The request a forwarded_request frame carries, for the control plane's handler."""
    req = Request()
    req.method = header["method"].encode("latin-1")
    req.path = header["path"]
    req.query = header["query"].encode("latin-1")
    req.url = (header["path"] + ("?" + header["query"] if header["query"] else "")).encode("latin-1")
    req.body = payload
    if header.get("authorization") is not None:
        req.authorization = header["authorization"].encode("latin-1")
    return req


def response_header(resp: Response) -> dict:
    """The reply header of the handler's response (its body is the payload)."""
    return {"status": resp.status, "content_type": resp.content_type.decode("latin-1"),
            "headers": resp.headers.decode("latin-1"), "error_code": resp.error_code}


def response_of(reply: dict, payload: bytes) -> Response:
    """The response a response_header reply carries, for the data plane to send."""
    return Response(reply["status"], payload, reply["content_type"].encode("latin-1"),
                    reply["headers"].encode("latin-1"), reply["error_code"])

"""The workers admin API: list, inspect, add and remove workers.
Error bodies follow the reference's admin shape: {"error": msg, "code": CODE}."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Awaitable, Callable, Optional

import orjson

from smg._fast.routes import Response, json_response
from smg._fast.worker import DECODE, PREFILL, REGULAR
from smg.workers import KV_EVENTS_LABEL, KV_REPLAY_LABEL, WORKER_TYPES, DuplicateWorker, endpoint_label_error

if TYPE_CHECKING:
    from smg.config import Config
    from smg.registration import Registrar
    from smg.workers import Registry


def _admin_error(status: int, code: str, message: str) -> Response:
    return json_response({"error": message, "code": code}, status)


def _json_object(req) -> tuple[Optional[dict], Optional[Response]]:
    try:
        body = orjson.loads(req.body) if req.body else None
    except orjson.JSONDecodeError as e:
        return None, _admin_error(400, "BAD_REQUEST", f"Invalid JSON body: {e}")
    if not isinstance(body, dict):
        return None, _admin_error(400, "BAD_REQUEST", "The request body must be a JSON object")
    return body, None


class AdminRoutes:
    """`inflight_source`, where the data plane runs in other processes: their
    in-flight counts per worker id (GET /workers shows the host's load)."""

    def __init__(self, cfg: Config, registry: Registry, registrar: Registrar,
                 inflight_source: Optional[Callable[[], Awaitable[dict]]] = None):
        self.cfg = cfg
        self.registry = registry
        self.registrar = registrar
        self.inflight_source = inflight_source

    def _with_host_loads(self, respond):
        """With --workers N the data-plane processes count the requests in
        flight and run the circuit breakers: fetch what they know before
        answering."""
        source = self.inflight_source
        if source is None:
            return respond()

        async def later() -> Response:
            known = await source()
            for w in self.registry.all():
                seen = known.get(w.id)
                if seen is None:
                    w.inflight = 0
                    continue
                w.inflight, w.cb_state, w.cb_failures, w.cb_opened_at = seen[0], seen[1], seen[2], seen[3]
                if seen[4] is not None and seen[5] > w.last_error_at:
                    w.last_error, w.last_error_at = seen[4], seen[5]
            return respond()

        return later()

    def list_workers(self, req):
        return self._with_host_loads(self._list_workers)

    def _list_workers(self) -> Response:
        registry = self.registry
        workers = registry.all()
        return json_response({
            "workers": [registry.info(w) for w in workers],
            "total": len(workers),
            "stats": {
                "prefill_count": sum(1 for w in workers if w.worker_type == PREFILL),
                "decode_count": sum(1 for w in workers if w.worker_type == DECODE),
                "regular_count": sum(1 for w in workers if w.worker_type == REGULAR),
            },
        })

    def worker_route(self, req) -> Response:
        """GET, PATCH, PUT and DELETE /workers/{id}."""
        worker_id = req.path[len("/workers/"):]
        try:
            uuid.UUID(worker_id)
        except ValueError:
            return _admin_error(400, "BAD_REQUEST", f"Invalid worker_id '{worker_id}' (expected UUID)")
        w = self.registry.get(worker_id)
        if w is None:
            return _admin_error(404, "WORKER_NOT_FOUND", f"Worker {worker_id} not found")
        if req.method == b"DELETE":
            self.registrar.cancel(w)
            self.registry.drain(w, "admin request")
            return json_response({"status": "accepted", "worker_id": w.id,
                                  "message": "Worker removal queued for background processing"}, 202)
        if req.method == b"PATCH":
            return self.update_worker(w, req)
        if req.method == b"PUT":
            return self.replace_worker(w, req)
        return self._with_host_loads(lambda: json_response(self.registry.info(w)))

    def update_worker(self, w, req) -> Response:
        """PATCH: labels (merged; a null value removes one), priority, cost."""
        body, err = _json_object(req)
        if err is not None:
            return err
        unknown = sorted(set(body) - {"labels", "priority", "cost"})
        if unknown:
            return _admin_error(400, "BAD_REQUEST", f"Unknown field(s) {', '.join(unknown)}: PATCH updates "
                                                    "labels, priority and cost (PUT replaces the worker)")
        labels = body.get("labels")
        if labels is not None and (not isinstance(labels, dict) or not all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in labels.items())):
            return _admin_error(400, "BAD_REQUEST", "Invalid value for field 'labels': expected string to string")
        priority = body.get("priority")
        if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool) or priority < 0):
            return _admin_error(400, "BAD_REQUEST", "Invalid value for field 'priority': expected an integer >= 0")
        cost = body.get("cost")
        if cost is not None and (not isinstance(cost, (int, float)) or isinstance(cost, bool) or cost < 0):
            return _admin_error(400, "BAD_REQUEST", "Invalid value for field 'cost': expected a number >= 0")
        bad = endpoint_label_error({k: v for k, v in (labels or {}).items() if v is not None})
        if bad is not None:
            return _admin_error(400, "BAD_REQUEST", f"Invalid value for field 'labels': {bad}")
        for key, value in (labels or {}).items():
            if value is None:
                w.labels.pop(key, None)
            else:
                w.labels[key] = value
        if labels and (KV_EVENTS_LABEL in labels or KV_REPLAY_LABEL in labels):
            self.registry.labels_changed(w)             # its event stream follows the new address
        if priority is not None:
            self.registry.overrides.setdefault(w.id, {})["priority"] = priority
        if cost is not None:
            self.registry.overrides.setdefault(w.id, {})["cost"] = float(cost)
        return json_response({"status": "accepted", "worker_id": w.id, "message": "Worker updated"}, 202)

    def replace_worker(self, w, req) -> Response:
        """PUT: the worker is drained and a new one registered from the body
        (POST /workers's fields); the answer names the new worker."""
        body, err = _json_object(req)
        if err is not None:
            return err
        if body.get("url") not in (None, w.url):
            return _admin_error(400, "BAD_REQUEST", f"PUT /workers/{w.id} keeps the URL {w.url}; "
                                                    "to move a worker, DELETE it and POST the new one")
        self.registrar.cancel(w)
        self.registry.remove(w, "replaced by an admin request")
        return self.add_worker_from(dict(body, url=w.url))

    def add_worker(self, req) -> Response:
        body, err = _json_object(req)
        if err is not None:
            return err
        return self.add_worker_from(body)

    def add_worker_from(self, body: dict) -> Response:
        url = body.get("url")
        if not isinstance(url, str) or not url:
            return _admin_error(400, "BAD_REQUEST", "Missing required field 'url'")
        wtype_name = body.get("worker_type", "regular") or "regular"
        if wtype_name not in WORKER_TYPES:
            return _admin_error(400, "BAD_REQUEST",
                                f"Invalid value for field 'worker_type': {wtype_name!r} (regular, prefill or decode)")
        wtype = WORKER_TYPES[wtype_name]
        pd = self.cfg.pd_disaggregation
        if pd and wtype == REGULAR:
            return _admin_error(400, "BAD_REQUEST", "In --pd-disaggregation mode worker_type must be prefill or decode")
        if not pd and wtype != REGULAR:
            return _admin_error(400, "BAD_REQUEST", f"worker_type {wtype_name!r} needs --pd-disaggregation")
        bootstrap_port = body.get("bootstrap_port")
        if bootstrap_port is not None and (not isinstance(bootstrap_port, int) or isinstance(bootstrap_port, bool)
                                           or not 0 < bootstrap_port < 65536):
            return _admin_error(400, "BAD_REQUEST", "Invalid value for field 'bootstrap_port': expected 1-65535")
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):
            return _admin_error(400, "BAD_REQUEST", "Invalid value for field 'labels': expected string to string")
        bad = endpoint_label_error(labels)
        if bad is not None:
            return _admin_error(400, "BAD_REQUEST", f"Invalid value for field 'labels': {bad}")
        api_key = body.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            return _admin_error(400, "BAD_REQUEST", "Invalid value for field 'api_key': expected a string")
        model_id = body.get("model_id")
        if model_id is not None and not isinstance(model_id, str):
            return _admin_error(400, "BAD_REQUEST", "Invalid value for field 'model_id': expected a string")
        try:
            w = self.registry.add(url, wtype, bootstrap_port, labels, api_key, source="api")
        except DuplicateWorker as e:
            return _admin_error(409, "WORKER_ALREADY_EXISTS", str(e))
        except ValueError as e:
            return _admin_error(400, "BAD_REQUEST", f"Invalid value for field 'url': {e}")
        self.registrar.register(w, model_id)
        location = f"/workers/{w.id}"
        return json_response({"status": "accepted", "worker_id": w.id, "url": w.url, "location": location,
                              "message": "Worker addition queued for background processing"}, 202,
                             b"location: " + location.encode() + b"\r\n")

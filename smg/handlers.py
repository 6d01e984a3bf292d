"""Routes the gateway answers itself: health, readiness, the
model list, the info routes forwarded to one worker, and the fan-out
routes (/flush_cache, /get_loads, stored responses)."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
from typing import TYPE_CHECKING, Callable, Optional

import orjson

from smg import __version__
from smg._fast.routes import Response, error_response, json_response, text_response
from smg._fast.fetch import fetch
from smg._fast.worker import DECODE, PREFILL, READY, REGULAR, TYPE_NAMES, Worker

if TYPE_CHECKING:
    from smg.config import Config
    from smg.workers import Registry

log = logging.getLogger("smg.routes")


class GatewayRoutes:
    """`shutting_down`: whether the gateway is stopping (readiness turns false)."""

    def __init__(self, cfg: Config, registry: Registry, shutting_down: Callable[[], bool]):
        self.cfg = cfg
        self.registry = registry
        self.shutting_down = shutting_down
        self._rr = itertools.count()

    # --- probes ---

    def health(self, req) -> Response:
        return text_response("OK")

    def readiness(self, req) -> Response:
        registry = self.registry
        if self.shutting_down():
            return json_response({"status": "not ready", "reason": "shutting down"}, 503)
        if self.cfg.pd_disaggregation:
            prefill = registry.ready(PREFILL)
            decode = registry.ready(DECODE)
            total = len(registry.of_type(PREFILL)) + len(registry.of_type(DECODE))
            if prefill and decode:
                return json_response({"status": "ready", "healthy_workers": len(prefill) + len(decode),
                                      "total_workers": total, "prefill_workers": len(prefill),
                                      "decode_workers": len(decode)})
            return json_response({"status": "not ready", "reason": "insufficient healthy workers",
                                  "prefill_workers": len(prefill), "decode_workers": len(decode)}, 503)
        healthy = registry.ready(REGULAR)
        total = len(registry.of_type(REGULAR))
        if healthy:
            return json_response({"status": "ready", "healthy_workers": len(healthy), "total_workers": total})
        return json_response({"status": "not ready", "reason": "insufficient healthy workers"}, 503)

    # --- models ---

    def models(self, req) -> Response:
        seen: dict[str, None] = {}
        types = (DECODE, PREFILL) if self.cfg.pd_disaggregation else (REGULAR,)
        for t in types:
            for w in self.registry.of_type(t):
                if w.model_id != "unknown" or w.state == READY:
                    seen.setdefault(w.model_id, None)
        if not seen:
            return error_response(503, "no_models_available", "No models available")
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "self_hosted"} for m in seen]
        return json_response({"object": "list", "data": data})

    def model(self, req) -> Response:
        """GET /v1/models/{id}: one served model, OpenAI's shape."""
        model_id = req.path[len("/v1/models/"):]
        listing = self.models(req)
        if listing.status != 200:
            return listing
        for item in orjson.loads(listing.body)["data"]:
            if item["id"] == model_id:
                return json_response(item)
        return error_response(404, "model_not_found", f"The model '{model_id}' does not exist")

    # --- forwarded to one worker ---

    def _pick_ready(self) -> Optional[Worker]:
        t = DECODE if self.cfg.pd_disaggregation else REGULAR
        ready = self.registry.ready(t)
        if not ready:
            return None
        return ready[next(self._rr) % len(ready)]

    async def _forward_get(self, req, path: str) -> Response:
        w = self._pick_ready()
        if w is None:
            return error_response(503, "no_available_workers", "No available workers")
        headers = [("authorization", f"Bearer {w.api_key}")] if w.api_key else None
        try:
            res = await fetch(w.control_pool, "GET", path, headers=headers, timeout=self.cfg.request_timeout_secs)
        except asyncio.TimeoutError:
            return error_response(504, "request_timeout", f"Worker {w.url} did not answer {path} in time")
        except OSError as e:
            return error_response(502, "worker_unreachable", f"Worker {w.url} failed on {path}: {e}")
        return Response(res.status, res.body, res.content_type or b"application/json",
                        w.url_header)

    def server_info(self, req):
        return self._forward_get(req, "/get_server_info")

    def model_info(self, req):
        return self._forward_get(req, "/get_model_info")

    def health_generate(self, req):
        return self._forward_get(req, "/health_generate")

    # --- fan-out ---

    async def _fan_out(self, method: str, path: str, workers: list[Worker], timeout: float,
                       client_auth: Optional[str] = None):
        """`client_auth`: the client's Authorization, sent to workers that have no key of their own."""
        async def one(w: Worker):
            auth = f"Bearer {w.api_key}" if w.api_key else client_auth
            headers = [("authorization", auth)] if auth else None
            try:
                res = await fetch(w.control_pool, method, path, body=b"" if method == "POST" else None,
                                  headers=headers, timeout=timeout)
                return w, res, None
            except (OSError, asyncio.TimeoutError) as e:
                return w, None, str(e) or type(e).__name__

        return await asyncio.gather(*(one(w) for w in workers))

    async def stored_response(self, req) -> Response:
        """GET/DELETE /v1/responses/{id}, GET .../input_items, POST .../cancel.
        The gateway stores no responses; an engine that does (SGLang with
        `store`) answers for the ones it produced, so every ready worker is
        asked and the first that knows the id answers. When none does, the
        answer is the reference's 404 (for cancel, a worker's refusal other
        than 404 is relayed: the response exists but cannot be cancelled)."""
        rest = req.path[len("/v1/responses/"):]
        response_id, _, action = rest.partition("/")
        allowed = {"": ("GET", "DELETE"), "input_items": ("GET",), "cancel": ("POST",)}.get(action)
        method = req.method.decode()
        if not response_id or allowed is None:
            return error_response(404, "unknown_url", f"Invalid URL ({method} {req.path})")
        if method not in allowed:
            return error_response(405, "method_not_allowed", f"Invalid URL ({method} {req.path})",
                                  headers=b"allow: " + ", ".join(allowed).encode() + b"\r\n")
        path = req.path + ("?" + req.query.decode("latin-1") if req.query else "")
        workers = self.registry.ready(DECODE if self.cfg.pd_disaggregation else REGULAR)
        auth = req.authorization.decode("latin-1") if req.authorization is not None else None
        results = await self._fan_out(method, path, workers, self.cfg.request_timeout_secs, auth)
        refusal = None
        for w, res, err in results:
            if res is None:
                continue
            if 200 <= res.status < 300:
                return Response(res.status, res.body, res.content_type or b"application/json", w.url_header)
            if action == "cancel" and res.status not in (404, 405) and refusal is None:
                refusal = Response(res.status, res.body, res.content_type or b"application/json", w.url_header)
        if refusal is not None:
            return refusal
        return error_response(404, "not_found", f"No response found with id '{response_id}'")

    async def flush_cache(self, req) -> Response:
        workers = [w for w in self.registry.all() if w.state == READY]
        results = await self._fan_out("POST", "/flush_cache", workers, self.cfg.request_timeout_secs)
        failed = []
        for w, res, err in results:
            if err is not None:
                failed.append({"worker_url": w.url, "error": err})
            elif not 200 <= res.status < 300:
                failed.append({"worker_url": w.url, "error": f"status {res.status}",
                               "body": res.body.decode("utf-8", "replace")[:500]})
        flushed = len(workers) - len(failed)
        body = {
            "status": "success" if not failed else "partial_success",
            "message": (f"Successfully flushed cache on all {flushed} workers" if not failed
                        else f"Flushed cache on {flushed} of {len(workers)} workers"),
            "workers_flushed": flushed,
            "total_http_workers": len(workers),
            "total_grpc_workers": 0,
            "total_zmq_workers_skipped": 0,
            "total_workers": len(workers),
            "failed_workers": failed,
        }
        return json_response(body, 200 if not failed else 206)

    async def start_profile(self, req) -> Response:
        return await self._profile("/start_profile")

    async def stop_profile(self, req) -> Response:
        return await self._profile("/stop_profile")

    async def _profile(self, path: str) -> Response:
        """Start or stop the engines' profilers on every ready worker."""
        workers = [w for w in self.registry.all() if w.state == READY]
        results = await self._fan_out("POST", path, workers, self.cfg.request_timeout_secs)
        ok = [w.url for w, res, err in results if err is None and 200 <= res.status < 300]
        failed = [w.url for w, res, err in results if not (err is None and 200 <= res.status < 300)]
        for w, res, err in results:
            if w.url in failed:
                log.warning("%s on %s failed: %s", path, w.url, err or f"status {res.status}")
        action = "started" if path == "/start_profile" else "stopped"
        body = {
            "status": "success" if not failed else ("partial_success" if ok else "failed"),
            "message": f"Profiling {action} on {len(ok)} of {len(workers)} workers",
            "workers_profiled": len(ok),
            "total_workers": len(workers),
            "successful": ok,
            "failed": failed,
        }
        return json_response(body, 200 if not failed else (206 if ok else 502))

    async def engine_metrics(self, req) -> Response:
        """GET /engine_metrics: every ready worker's Prometheus metrics in one
        exposition, each sample labelled with its worker."""
        workers = [w for w in self.registry.all() if w.state == READY]
        results = await self._fan_out("GET", "/metrics", workers, self.cfg.health_check_timeout_secs)
        seen_meta: set[str] = set()
        lines: list[str] = []
        answered = 0
        for w, res, err in results:
            if err is not None or res.status != 200:
                log.warning("/engine_metrics: %s did not serve /metrics: %s", w.url, err or f"status {res.status}")
                continue
            answered += 1
            label = 'worker="' + w.url.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for line in res.body.decode("utf-8", "replace").splitlines():
                if not line.strip():
                    continue
                if line.startswith("#"):
                    if line not in seen_meta:
                        seen_meta.add(line)
                        lines.append(line)
                    continue
                lines.append(_add_label(line, label))
        if workers and not answered:
            return error_response(502, "upstream_error", "No worker served /metrics")
        return Response(200, ("\n".join(lines) + "\n").encode() if lines else b"",
                        b"text/plain; version=0.0.4; charset=utf-8")

    async def get_loads(self, req) -> Response:
        workers = [w for w in self.registry.all() if w.state == READY]
        results = await self._fan_out("GET", "/v1/loads", workers, self.cfg.health_check_timeout_secs)
        loads = []
        for w, res, _ in results:
            entries = []
            if res is not None and 200 <= res.status < 300:
                try:
                    doc = orjson.loads(res.body)
                except orjson.JSONDecodeError:
                    doc = None
                if isinstance(doc, dict) and isinstance(doc.get("loads"), list):
                    entries = [e for e in doc["loads"] if isinstance(e, dict)]
            for e in entries:
                loads.append({**e, "worker": w.url, "worker_type": TYPE_NAMES[w.worker_type]})
        now = datetime.datetime.now(datetime.timezone.utc).isoformat()
        return json_response({"timestamp": now, "version": f"smg-{__version__}", "dp_rank_count": len(loads),
                              "loads": loads})


def _add_label(sample: str, label: str) -> str:
    """`name{a="b"} 1` -> `name{a="b",LABEL} 1`; `name 1` -> `name{LABEL} 1`."""
    brace = sample.find("{")
    space = sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        close = sample.find("}", brace)
        inner = sample[brace + 1:close]
        return sample[:brace + 1] + (inner + "," if inner else "") + label + sample[close:]
    if space == -1:
        return sample
    return sample[:space] + "{" + label + "}" + sample[space:]

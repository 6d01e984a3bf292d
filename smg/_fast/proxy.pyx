# cython: language_level=3
"""Proxied routes with regular workers.

ProxyHandler is the route handler of every proxied POST route: it parses
the JSON body once (for the model and the routing text), picks a worker
group and hands the request to a ProxyCall. A ProxyCall sends the client's
body bytes unchanged over a pooled keep-alive connection and relays the
response as it arrives (chunk framing passed through), retrying on another
worker while nothing has reached the client yet."""

import logging
import time

import orjson

from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_GET_LENGTH
from smg._fast.bodyjson cimport parse_json
from smg._fast.clock cimport monotonic
from smg._fast.http1 cimport ResponseParser
from smg._fast.exchange cimport FAIL_CONNECT
from smg._fast.admission cimport Admission
from smg._fast.call cimport Leg, LEG_STOP, new_leg, retryable_status, failure_status, forwarded_head, with_dp_rank
from smg._fast.worker cimport Worker, TYPE_REGULAR
from smg._fast.routing_text cimport routing_prompt, invalid_field, EP_RERANK, EP_MESSAGES, EP_COUNT_TOKENS
from smg._fast.routes cimport Route, anthropic_error_type

from smg._fast.routing_text import ENDPOINT_NAMES
from smg._fast.admission import queue_or_reject
from smg._fast.worker import TYPE_NAMES

_log = logging.getLogger("smg.proxy")
_TYPE_NAMES = TYPE_NAMES


cdef WorkerGroup resolve_group(Router router, RequestCycle cycle, str model, int worker_type):
    """The candidates of `worker_type` for `model` (None: the only model
    served), or None after answering the client with an error."""
    cdef WorkerGroup g
    cdef list groups
    cdef str kind = "" if worker_type == TYPE_REGULAR else _TYPE_NAMES[worker_type] + " "
    if model is not None:
        g = router.group(worker_type, model)
        if g is None:
            if not router.groups_of(worker_type) and worker_type != TYPE_REGULAR:
                cycle.respond_error(503, "no_available_workers", f"No available {kind}workers")
            else:
                cycle.respond_error(404, "model_not_found", f"No {kind}worker available for model '{model}'")
        return g
    groups = router.groups_of(worker_type)
    if len(groups) == 1:
        return <WorkerGroup>groups[0]
    if not groups:
        # no workers at all: the reference's answer is the unknown model's
        if worker_type == TYPE_REGULAR:
            cycle.respond_error(404, "model_not_found", "No worker available for model 'unknown'")
        else:
            cycle.respond_error(503, "no_available_workers", f"No available {kind}workers")
        return None
    # several models: only one may have ready workers
    ready = [g for g in groups if (<WorkerGroup>g).ready]
    if len(ready) == 1:
        return <WorkerGroup>ready[0]
    cycle.respond_error(400, "missing_model",
                        "The workers serve several models ("
                        + ", ".join(sorted((<WorkerGroup>g).model_id for g in groups))
                        + "); name one in the request's 'model' field")
    return None


cdef object parse_body(RequestCycle cycle, int endpoint):
    """The request body as a dict, or None after answering with a 400."""
    try:
        obj = parse_json(cycle.req.body)
    except orjson.JSONDecodeError as e:
        cycle.respond_error(400, "json_parse_error", f"Failed to parse the request body as JSON: {e}")
        return None
    if type(obj) is not dict:
        cycle.respond_error(400, "invalid_request", "The request body must be a JSON object")
        return None
    cdef tuple why
    model = (<dict>obj).get("model")
    if model is not None and type(model) is not str:
        cycle.respond_error(400, "invalid_type", "'model' must be a string", None, "model")
        return None
    why = invalid_field(endpoint, <dict>obj)
    if why is not None:
        cycle.respond_error(400, why[0], why[2], None, why[1])
        return None
    return obj


cdef object resolve_alias(CallSettings settings, RequestCycle cycle, dict obj):
    """The request's model, with a --model-alias name replaced by the model
    it stands for, in the body the workers get too (they know only that
    name)."""
    model = obj.get("model")
    if settings.model_aliases and type(model) is str:
        canonical = settings.model_aliases.get(model)
        if canonical is not None:
            obj["model"] = canonical
            cycle.req.body = orjson.dumps(obj)
            return canonical
    return model


cdef bytes routing_key(Request req):
    """consistent_hashing's key: X-SMG-Routing-Key, else Authorization, else X-Forwarded-For."""
    if req.routing_key is not None:
        return req.routing_key
    if req.authorization is not None:
        return req.authorization
    return req.forwarded_for


cdef bytes session_key(Request req):
    """--sticky-sessions: the session a request belongs to, its routing key
    (X-SMG-Routing-Key or --routing-key-headers), else the request id the
    client sent (a resent or follow-up request that carries it stays
    together); None: no session."""
    if req.routing_key is not None:
        return req.routing_key
    return req.request_id if req.id_from_client else None


cdef str model_label(Router router, object model, int worker_type):
    """The router metrics' model label: the served model the request names,
    "unknown" when it names none, "other" for one not served here."""
    if model is None or type(model) is not str or not model:
        return "unknown"
    return <str>model if router.group(worker_type, <str>model) is not None else "other"


cdef class ProxiedRoute(RequestHandler):

    def __init__(self, CallSettings settings, int endpoint):
        self.settings = settings
        self.endpoint = endpoint
        self.endpoint_name = ENDPOINT_NAMES[endpoint]

    cdef RouterSeries count_routed(self, str backend, str label, bint streamed):
        """Count a request in smg_router_requests_total; returns its series
        (for the call to record its duration in). A handler counts for one
        backend and endpoint, and most requests name the same model as the
        one before: that series is kept at hand."""
        cdef RouterSeries s = self.counted_series
        if s is None or (label is not self.counted_label and label != self.counted_label):
            s = self.settings.series_of(backend, label, self.endpoint_name)
            self.counted_series = s
            self.counted_label = label
        if streamed:
            s.streamed += 1
        else:
            s.plain += 1
        return s

    cdef int launch(self, ClientCall call) except -1:
        """Start the call now if admission control has a slot, else queue it
        (or answer 429)."""
        cdef Admission adm = self.settings.admission
        if adm.try_enter():
            call.cycle.admission = adm
            call.start()
        else:
            queue_or_reject(adm, call.cycle, call.start_py)
        return 0

    cdef int no_group(self, RequestCycle cycle, str backend, str label, int worker_type) except -1:
        """resolve_group answered the client: count the error."""
        kind = "invalid_request" if label == "unknown" and self.settings.router.groups_of(worker_type) \
            else "no_workers"
        self.settings.count_error(backend, label, self.endpoint_name, kind)
        return 0


cdef class ProxyHandler(ProxiedRoute):

    cdef bint can_stream(self, Request req):
        """A body over --max-buffered-request-bytes may stream to the worker
        when the gateway does not need to read it: one model served, a
        policy that does not route by text, no alias to rewrite, no rank to
        name (--dp-aware), and a route whose answer it passes through. The
        worker validates such a body; the request is not retried."""
        cdef CallSettings settings = self.settings
        cdef list groups
        cdef WorkerGroup g
        cdef Worker w
        if self.endpoint == EP_RERANK or self.endpoint == EP_MESSAGES or self.endpoint == EP_COUNT_TOKENS \
                or settings.model_aliases:
            return False
        groups = settings.router.groups_of(TYPE_REGULAR)
        if len(groups) != 1:
            return False
        g = <WorkerGroup>groups[0]
        if g.policy.needs_text or not g.ready:
            return False
        for w in g.ready:
            if w.dp_rank >= 0:
                return False
        return True

    cdef int handle_streamed(self, RequestCycle cycle) except -1:
        """A request whose body is still arriving (can_stream said yes)."""
        cdef WorkerGroup group = resolve_group(self.settings.router, cycle, None, TYPE_REGULAR)
        cdef RouterSeries series = self.count_routed("regular", "unknown", False)
        cdef ProxyCall call
        if group is None:
            self.no_group(cycle, "regular", "unknown", TYPE_REGULAR)
            return 0
        key = cycle.req.routing_key if group.policy.header_key_only else routing_key(cycle.req)
        call = new_proxy_call(self, cycle, group, None, key, "unknown")
        call.series = series
        self.launch(call)
        return 0

    cdef int handle(self, RequestCycle cycle) except -1:
        if cycle.streaming:
            return self.handle_streamed(cycle)
        cdef object obj = parse_body(cycle, self.endpoint)
        cdef WorkerGroup group
        cdef str text = None
        cdef bint is_prompt = False
        cdef str label
        cdef bytes key
        cdef ProxyCall call
        cdef RouterSeries series
        if obj is None:
            return 0
        model = resolve_alias(self.settings, cycle, <dict>obj)
        if self.endpoint == EP_RERANK and model is None and cycle.req.path == "/rerank":
            # SGLang's native rerank route names its model (as on the reference)
            cycle.respond_error(400, "missing_required_parameter", "'model' is required", None, "model")
            return 0
        group = resolve_group(self.settings.router, cycle, <str>model if model else None, TYPE_REGULAR)
        # the metrics' model label, from the group just resolved (model_label without a second lookup)
        label = "unknown" if not model else (<str>model if group is not None else "other")
        streamed = (<dict>obj).get("stream") is True
        series = self.count_routed("regular", label, streamed)
        if group is None:
            self.no_group(cycle, "regular", label, TYPE_REGULAR)
            return 0
        if group.policy.needs_text:
            text = routing_prompt(self.endpoint, <dict>obj, &is_prompt)
        key = cycle.req.routing_key if group.policy.header_key_only else routing_key(cycle.req)
        if self.endpoint == EP_RERANK:
            call = new_rerank_call(self, cycle, group, text, key, label, model)
        elif self.endpoint == EP_MESSAGES or self.endpoint == EP_COUNT_TOKENS:
            call = new_messages_call(self, cycle, group, text, key, label)
        else:
            call = new_proxy_call(self, cycle, group, text, key, label)
        call.text_is_prompt = is_prompt
        call.answer_streamed = streamed
        call.series = series
        obj = text = None  # the call holds what it needs; a long prompt's str is let go once routed
        self.launch(call)
        return 0


cdef ProxyCall new_proxy_call(ProxyHandler handler, RequestCycle cycle, WorkerGroup group, str text, bytes key,
                              str label):
    cdef ProxyCall call = ProxyCall.__new__(ProxyCall)
    call.init(handler, cycle, group, text, key, label)
    return call


cdef class ProxyCall(ClientCall):
    """One leg at a time, to a worker of one group; a failed attempt goes to
    another worker (the policy is told which one failed)."""
    cdef WorkerGroup group
    cdef int endpoint
    cdef str text                        # the routing text (None: not needed, or let go: see attempt)
    cdef bint text_let_go
    cdef bint text_is_prompt             # the text is the prompt the engine tokenizes (see routing_prompt)
    cdef bytes key
    cdef Worker failed_worker
    cdef bytes head_start
    cdef bytes head_common
    cdef bytes client_auth
    cdef bytes session                   # --sticky-sessions: the request's session key
    cdef bint wants_payload              # the body without chunk framing (a call that rewrites it)
    cdef bint answer_streamed            # the client asked for a streamed answer ("stream": true)

    cdef int init(self, ProxyHandler handler, RequestCycle cycle, WorkerGroup group, str text, bytes key,
                  str label) except -1:
        self.setup(handler.settings, handler.endpoint_name, cycle, group.worker_type, "regular", label)
        self.group = group
        self.endpoint = handler.endpoint
        self.text = text
        self.key = key
        if group.sticky is not None:
            self.session = session_key(cycle.req)
        return 0

    cdef int start(self) except -1:
        cdef Request req = self.req
        if self.cycle.streaming:
            # the client's framing: its Content-Length, or chunks
            self.head_common = forwarded_head(req, -1 if req.chunked else int(req.content_length))
        else:
            self.head_common = forwarded_head(req, PyBytes_GET_SIZE(req.body))
        self.head_start = b"POST " + req.url + b" HTTP/1.1\r\n"
        if req.authorization is not None:
            self.client_auth = b"authorization: " + req.authorization + b"\r\n"
        elif req.x_api_key is not None and (<Route>req.route).anthropic:
            self.client_auth = b"authorization: Bearer " + req.x_api_key + b"\r\n"
        else:
            self.client_auth = b""
        return ClientCall.start(self)

    cdef int attempt(self) except -1:
        cdef Worker w
        cdef bytes auth, body, head
        cdef Leg leg
        if self.text_let_go:
            # a retry of a long prompt: its text again, from the body
            self.text = routing_prompt(self.endpoint, parse_json(self.req.body), &self.text_is_prompt)
        w = self.group.select(self.text, self.key, monotonic(), self.failed_worker, self.session,
                              self.text_is_prompt)
        if self.text is not None and PyUnicode_GET_LENGTH(self.text) > KEPT_TEXT_CHARS:
            # while the call lasts the body is all it holds of a long prompt
            self.text = None
            self.text_let_go = True
        if w is None:
            self.fail_to_client(self.error_status, self.error_code, self.error_message)
            return 0
        self.attempts += 1
        auth = w.auth_header if w.auth_header is not None else self.client_auth
        if w.dp_rank >= 0:
            body = with_dp_rank(self.req.body, w.dp_rank)
            head = self.head_start + w.host_header + auth + forwarded_head(self.req, PyBytes_GET_SIZE(body))
        else:
            body = self.req.body
            head = self.head_start + w.host_header + auth + self.head_common
        # an HTTP/1.0 client cannot take chunked bodies: relay the payload only
        leg = new_leg(self, w, head, body, self.req.http_minor == 0 or self.wants_payload)
        if not self.answer_streamed:
            # nothing of the answer arrives before all of it: when the
            # prefill ends cannot be seen, so it is not counted as queued
            leg.unqueue_prefill()
        if self.cycle.streaming:
            leg.stream_body(self.req.chunked)
        self.relaying = leg
        leg.begin()
        return 0

    cdef int end_legs(self, int how) except -1:
        if self.relaying is not None:
            self.relaying.end(how)
        return 0

    cdef int leg_head(self, Leg leg, ResponseParser p, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        cdef int status = p.status
        cdef bint failed = failure_status(status)
        leg.worker.record_outcome(not failed, monotonic())
        if failed:
            leg.worker.note_error(f"answered {status} to {self.req.path}")
        if retryable_status(status) and self.can_retry():
            leg.end(LEG_STOP)
            self.failed_worker = leg.worker
            self.note_error(status, "upstream_error", f"worker answered {status}")
            self.retry(leg.worker)
            return 0
        self.relay(self.response_head(p, leg.worker, leg.decoded), data, off, n)
        return 0

    cdef int leg_body(self, Leg leg, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        if not self.done:
            self.relay(None, data, off, n)
        return 0

    cdef int leg_done(self, Leg leg) except -1:
        if not self.done:
            self.end_relay()
        return 0

    cdef int leg_failed(self, Leg leg, object exc, int stage) except -1:
        if self.done:
            return 0
        if self.head_sent:
            _log.warning("worker %s dropped a response mid-stream: %s", leg.worker.url, exc)
            self.break_stream(502, "upstream_error", f"Worker {leg.worker.url} failed mid-stream: {exc}")
            return 0
        self.failed_worker = leg.worker
        # the reference's codes and status (500) for transport failures
        if stage == FAIL_CONNECT:
            self.note_error(500, "call_upstream_connection_failed",
                            f"Could not connect to worker {leg.worker.url}: {exc}")
        else:
            self.note_error(500, "call_upstream_request_error",
                            f"Worker {leg.worker.url} failed before responding: {exc}")
        if self.can_retry():
            self.retry(leg.worker)
        else:
            self.fail_to_client(self.error_status, self.error_code, self.error_message)
        return 0


cdef class CollectingCall(ProxyCall):
    """A call whose answer, for some statuses, is read whole and rewritten
    before it reaches the client (answers it does not want are relayed as
    they come)."""
    cdef ResponseParser head

    cdef bint wants_whole(self, int status):
        return False

    cdef bytes rewrite(self, int status, bytes body):
        return body

    cdef int leg_head(self, Leg leg, ResponseParser p, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        cdef int status = p.status
        if not self.wants_whole(status) or (retryable_status(status) and self.can_retry()):
            return ProxyCall.leg_head(self, leg, p, data, off, n)
        leg.worker.record_outcome(not failure_status(status), monotonic())
        self.head = p
        leg.collecting = True
        if n:
            leg.parts.append(data[off:off + n])
        return 0

    cdef int leg_done(self, Leg leg) except -1:
        cdef bytes body
        if self.done:
            return 0
        if self.head is None:
            return ProxyCall.leg_done(self, leg)
        body = self.rewrite(self.head.status, b"".join(leg.parts))
        leg.parts = []
        self.cycle.write(self.response_head(self.head, leg.worker, True, len(body)) + body)
        self.complete(None)
        return 0


cdef RerankCall new_rerank_call(ProxyHandler handler, RequestCycle cycle, WorkerGroup group, str text, bytes key,
                                str label, object model):
    cdef RerankCall call = RerankCall.__new__(RerankCall)
    call.init(handler, cycle, group, text, key, label)
    call.model = model if type(model) is str else "unknown"
    call.wants_payload = True
    return call


cdef class RerankCall(CollectingCall):
    """Rerank, answered in the reference's shape: a worker's list of
    {index, score, document} becomes {"results": [...], "model", "usage",
    "object": "rerank", "id", "created"}. Any other answer is relayed as it
    is (a worker that already answers in that shape included)."""
    cdef str model

    cdef bint wants_whole(self, int status):
        return status == 200

    cdef bytes rewrite(self, int status, bytes body):
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if type(doc) is not list:
            return body
        return orjson.dumps({
            "results": [{k: item[k] for k in ("score", "document", "index") if k in item}
                        if type(item) is dict else item for item in doc],
            "model": self.model, "usage": None, "object": "rerank", "id": None, "created": int(time.time()),
        })


cdef MessagesCall new_messages_call(ProxyHandler handler, RequestCycle cycle, WorkerGroup group, str text,
                                    bytes key, str label):
    cdef MessagesCall call = MessagesCall.__new__(MessagesCall)
    call.init(handler, cycle, group, text, key, label)
    call.wants_payload = True
    return call


cdef class MessagesCall(CollectingCall):
    """The Anthropic Messages API. Answers pass through, except a worker's
    error in another shape (an OpenAI-style {"error": {...}} or a bare
    {"error": "..."}), which becomes {"type": "error", "error": {"type",
    "message"}, "request_id"} so that Anthropic clients can read it. A
    body that is not JSON is relayed as it is."""

    cdef bint wants_whole(self, int status):
        return status >= 400

    cdef bytes rewrite(self, int status, bytes body):
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if type(doc) is not dict or (<dict>doc).get("type") == "error":
            return body
        err = (<dict>doc).get("error")
        if type(err) is dict:
            message = (<dict>err).get("message")
        elif type(err) is str:
            message = err
        else:
            message = (<dict>doc).get("message") or (<dict>doc).get("detail")
        if type(message) is not str:
            message = body.decode("utf-8", "replace")
        return orjson.dumps({"type": "error", "error": {"type": anthropic_error_type(status), "message": message},
                             "request_id": self.req.request_id.decode("latin-1")})

# cython: language_level=3
"""Prefill/decode disaggregation, SGLang style.

A PDCall picks a prefill and a decode worker, adds the bootstrap fields
(bootstrap_host, bootstrap_port, bootstrap_room; lists for batches) to the
body, and sends it to both at once. The client gets the decode worker's
response, relayed as it arrives. The prefill response is read and dropped
-- unless the client asked /generate for logprobs, in which case prefill's
meta_info.input_token_logprobs are put in front of decode's (this, and only
this, waits for the prefill body). An error from either side, before
anything reached the client, is retried on a fresh pair or answered with a
clear error; both workers are released however the request ends."""

import logging
from collections import deque

import orjson

from cpython.bytes cimport PyBytes_GET_SIZE, PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy
from cpython.unicode cimport PyUnicode_GET_LENGTH
from smg._fast.bodyjson cimport parse_json
from smg._fast.clock cimport monotonic
from smg._fast.http1 cimport ResponseParser
from smg._fast.exchange cimport FAIL_CONNECT
from smg._fast.cycle cimport RequestCycle
from smg._fast.request cimport Request
from smg._fast.worker cimport Worker, TYPE_PREFILL, TYPE_DECODE
from smg._fast.policies cimport WorkerGroup, rand64
from smg._fast.routing_text cimport routing_prompt, EP_GENERATE, EP_COMPLETIONS
from smg._fast.call cimport (ClientCall, RouterSeries, Leg, LEG_STOP, new_leg, wrap_chunk, retryable_status, failure_status,
                             forwarded_head, with_dp_rank)
from smg._fast.proxy cimport KEPT_TEXT_CHARS, ProxiedRoute, resolve_group, parse_body, resolve_alias, routing_key, session_key, model_label

_log = logging.getLogger("smg.pd")

BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")

# With return_logprob, decode's answer waits for prefill's logprobs: at most
# this many bytes of it are held, then the decode connection is not read
# until prefill has answered.
DEF PD_HOLD_BYTES = 131072


cpdef Py_ssize_t batch_size(int endpoint, dict body):
    """Items in a batch request, or -1 for a single request."""
    if endpoint == EP_GENERATE:
        text = body.get("text")
        if type(text) is list:
            return len(<list>text)
        ids = body.get("input_ids")
        if type(ids) is list and ids and type((<list>ids)[0]) is list:
            return len(<list>ids)
    elif endpoint == EP_COMPLETIONS:
        prompt = body.get("prompt")
        if type(prompt) is list and prompt and type((<list>prompt)[0]) is str:
            return len(<list>prompt)
    return -1


cpdef bytes add_bootstrap(bytes body, dict obj, str host, object port, Py_ssize_t batch):
    """The body (parsed: `obj`) with the bootstrap fields. Spliced in front
    of the closing brace when the client sent none of them (the common
    case: no re-serialization); otherwise the client's values are overwritten."""
    return bootstrap_body(body, obj if has_bootstrap_fields(obj) else None, not obj, host, port, batch)


cdef bint has_bootstrap_fields(dict obj):
    for key in BOOTSTRAP_KEYS:
        if key in obj:
            return True
    return False


cdef bytes bootstrap_body(bytes body, dict merge_into, bint empty, str host, object port, Py_ssize_t batch):
    """add_bootstrap for a call that keeps of the parsed body only what this
    needs: `merge_into`, the parsed body when the client sent bootstrap
    fields itself (re-serialized with the gateway's), else None; `empty`,
    whether the body is the empty object."""
    cdef object hosts, ports, rooms
    cdef Py_ssize_t end
    cdef bytes fields
    if batch < 0:
        hosts, ports, rooms = host, port, <long long>(rand64() >> 1)
    else:
        hosts = [host] * batch
        ports = [port] * batch
        rooms = [<long long>(rand64() >> 1) for _ in range(batch)]
    end = PyBytes_GET_SIZE(body)
    while end > 0 and body[end - 1] in b" \t\r\n":
        end -= 1
    if merge_into is None and (end == 0 or body[end - 1] != 125):  # "}"
        merge_into = parse_json(body)  # not an object's text as parsed: never for a checked body
    if merge_into is not None:
        merged = dict(merge_into)
        merged["bootstrap_host"] = hosts
        merged["bootstrap_port"] = ports
        merged["bootstrap_room"] = rooms
        return orjson.dumps(merged)
    fields = ((b'"bootstrap_host":' if empty else b',"bootstrap_host":') + orjson.dumps(hosts)
              + b',"bootstrap_port":' + orjson.dumps(ports) + b',"bootstrap_room":' + orjson.dumps(rooms) + b"}")
    # made in one piece: slicing and concatenating would copy a long prompt twice more
    out = PyBytes_FromStringAndSize(NULL, end - 1 + PyBytes_GET_SIZE(fields))
    memcpy(PyBytes_AS_STRING(out), PyBytes_AS_STRING(body), end - 1)
    memcpy(PyBytes_AS_STRING(out) + end - 1, PyBytes_AS_STRING(fields), PyBytes_GET_SIZE(fields))
    return out


cdef object merge_logprobs(object prefill, object decode):
    """decode with prefill's meta_info.input_token_logprobs in front of its own
    (item by item for batches)."""
    cdef Py_ssize_t i
    if type(prefill) is list and type(decode) is list:
        return [merge_logprobs(p, d) for p, d in zip(prefill, decode)] + list(decode[len(prefill):])
    if type(prefill) is list:
        index = decode.get("index", 0) if type(decode) is dict else 0
        prefill = prefill[index] if type(index) is int and 0 <= index < len(prefill) else None
    if type(prefill) is not dict or type(decode) is not dict:
        return decode
    pm = prefill.get("meta_info")
    dm = decode.get("meta_info")
    if type(pm) is not dict or type(dm) is not dict:
        return decode
    plp = pm.get("input_token_logprobs")
    if type(plp) is not list:
        return decode
    dlp = dm.get("input_token_logprobs")
    dm["input_token_logprobs"] = plp + (dlp if type(dlp) is list else [])
    return decode


cdef object prefill_document(bytes body):
    """Prefill's answer as JSON: the body itself, or for a streamed answer the
    first SSE event that carries input_token_logprobs (else the last event)."""
    cdef object last = None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    for event in body.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        try:
            doc = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            continue
        last = doc
        meta = doc.get("meta_info") if type(doc) is dict else None
        if type(meta) is dict and "input_token_logprobs" in meta:
            return doc
    return last


cdef class PrefillQueue:
    """--prefill-max-inflight-requests-per-worker: a prefill worker with that
    many requests in flight takes no more (Worker.max_inflight makes it
    unroutable), and a request finding every prefill worker of its model
    at the limit waits here, in arrival order, for one to free a slot: at
    most `size` requests (then 429 prefill_queue_full), each at most
    `timeout` seconds (then 429 prefill_queue_timeout). Counts are per
    process."""
    cdef object waiting             # deque of [PDCall, enqueued at]
    cdef public Py_ssize_t size
    cdef public double timeout

    def __init__(self, Py_ssize_t size, double timeout):
        self.waiting = deque()
        self.size = size
        self.timeout = timeout

    def __len__(self):
        return len(self.waiting)

    cdef int wait(self, PDCall call, double now) except -1:
        """Queue `call` (or answer it 429 when the queue is full)."""
        if len(self.waiting) >= self.size:
            call.fail_to_client(429, "prefill_queue_full",
                                "Every prefill worker is at --prefill-max-inflight-requests-per-worker "
                                "and the prefill queue is full", b"retry-after: 1\r\n")
            return 0
        self.waiting.append([call, now])
        return 0

    def worker_freed(self, Worker worker):
        """A prefill worker went below its limit: start the waiting requests
        that can go now, oldest first (others keep their place)."""
        cdef PDCall call
        cdef double now = monotonic()
        for _ in range(len(self.waiting)):
            entry = self.waiting.popleft()
            call = <PDCall>entry[0]
            if call.done:
                continue
            if has_room(call.pgroup, now):
                call.attempt()
            else:
                self.waiting.append(entry)

    def sweep(self, double now):
        """Answer the requests that have waited `timeout` seconds; forget
        those whose client left."""
        cdef PDCall call
        cdef list expired = []
        if not self.waiting:
            return
        keep = deque()
        for entry in self.waiting:
            call = <PDCall>entry[0]
            if call.done:
                continue
            if now - <double>entry[1] >= self.timeout:
                expired.append(call)
            else:
                keep.append(entry)
        self.waiting = keep
        for call in expired:
            call.fail_to_client(429, "prefill_queue_timeout",
                                "The request waited too long for a prefill worker (--prefill-queue-timeout-secs)",
                                b"retry-after: 1\r\n")


cdef bint has_room(WorkerGroup group, double now):
    cdef Worker w
    for w in group.ready:
        if w.routable(now):
            return True
    return False


cdef bint at_limit(WorkerGroup group):
    """Some ready worker of the group is at its in-flight limit."""
    cdef Worker w
    for w in group.ready:
        if w.max_inflight > 0 and w.inflight >= w.max_inflight:
            return True
    return False


cdef class PDHandler(ProxiedRoute):

    cdef int handle(self, RequestCycle cycle) except -1:
        cdef object obj = parse_body(cycle, self.endpoint)
        cdef WorkerGroup prefill, decode
        cdef str text = None
        cdef bint is_prompt = False
        cdef RouterSeries series
        cdef PDCall call
        if obj is None:
            return 0
        model = resolve_alias(self.settings, cycle, <dict>obj) or None
        label = model_label(self.settings.router, model, TYPE_DECODE)
        series = self.count_routed("pd", label, (<dict>obj).get("stream") is True)
        prefill = resolve_group(self.settings.router, cycle, model, TYPE_PREFILL)
        if prefill is None:
            self.no_group(cycle, "pd", label, TYPE_PREFILL)
            return 0
        decode = resolve_group(self.settings.router, cycle, model, TYPE_DECODE)
        if decode is None:
            self.no_group(cycle, "pd", label, TYPE_DECODE)
            return 0
        if prefill.policy.needs_text or decode.policy.needs_text:
            text = routing_prompt(self.endpoint, <dict>obj, &is_prompt)
        key = cycle.req.routing_key if prefill.policy.header_key_only or decode.policy.header_key_only \
            else routing_key(cycle.req)
        call = new_pd_call(self, cycle, <dict>obj, prefill, decode, text, key, label)
        call.text_is_prompt = is_prompt
        call.series = series
        obj = text = None  # the call holds what it needs; a long prompt's str is let go once routed
        self.launch(call)
        return 0


cdef PDCall new_pd_call(PDHandler handler, RequestCycle cycle, dict obj, WorkerGroup pgroup, WorkerGroup dgroup,
                        str text, bytes key, str label):
    cdef PDCall call = PDCall.__new__(PDCall)
    call.setup(handler.settings, handler.endpoint_name, cycle, TYPE_DECODE, "pd", label)
    # of the parsed body, the call keeps what bootstrap_body needs (the body
    # holds the rest, a long prompt included)
    call.merge_into = obj if has_bootstrap_fields(obj) else None
    call.empty_body = not obj
    call.endpoint = handler.endpoint
    call.pgroup = pgroup
    call.dgroup = dgroup
    call.text = text
    call.key = key
    if pgroup.sticky is not None:
        call.session = session_key(cycle.req)
    call.batch = batch_size(handler.endpoint, obj)
    call.logprobs = handler.endpoint == EP_GENERATE and obj.get("return_logprob") is True
    call.stream = obj.get("stream") is True
    return call


cdef class PDCall(ClientCall):
    """Two legs per attempt, prefill and decode; decode's leg is relayed."""
    cdef dict merge_into            # the parsed body, when the client sent bootstrap fields (see bootstrap_body)
    cdef bint empty_body
    cdef int endpoint
    cdef bint text_let_go           # a long routing text, not kept once routed (see ProxyCall.attempt)
    cdef bint text_is_prompt        # the text is the prompt the engine tokenizes (see routing_prompt)
    cdef WorkerGroup pgroup
    cdef WorkerGroup dgroup
    cdef str text
    cdef bytes key
    cdef bytes session              # --sticky-sessions: the request's session key
    cdef Py_ssize_t batch
    cdef bint logprobs
    cdef bint stream
    cdef Leg prefill
    cdef Leg decode
    cdef Worker failed_prefill
    cdef Worker failed_decode
    cdef bint prefill_finished
    cdef bint decode_finished
    cdef object prefill_doc         # prefill's parsed body (logprobs mode)
    cdef list held                  # decode payload waiting for prefill (logprobs mode)
    cdef Py_ssize_t held_bytes
    cdef bytes sse_rest             # an incomplete SSE event (logprobs streaming)
    cdef ResponseParser decode_head # kept until the head can be written (logprobs mode)


    cdef int attempt(self) except -1:
        cdef double now = monotonic()
        cdef Worker pw, dw
        cdef Leg prefill, decode
        cdef bytes body, head, start, client_auth, pbody, dbody, phead, dhead
        cdef Request req = self.req
        if self.text_let_go:
            self.text = routing_prompt(self.endpoint, parse_json(req.body), &self.text_is_prompt)
        pw = self.pgroup.select(self.text, self.key, now, self.failed_prefill, self.session,
                                self.text_is_prompt)
        if pw is None and self.settings.prefill_queue is not None and at_limit(self.pgroup):
            (<PrefillQueue>self.settings.prefill_queue).wait(self, now)
            return 0
        dw = self.dgroup.select(self.text, self.key, now, self.failed_decode, self.session,
                                self.text_is_prompt)
        if self.text is not None and PyUnicode_GET_LENGTH(self.text) > KEPT_TEXT_CHARS:
            self.text = None
            self.text_let_go = True
        if pw is None or dw is None:
            self.fail_to_client(503, "no_available_workers",
                                "No available prefill worker" if pw is None else "No available decode worker")
            return 0
        self.attempts += 1
        self.prefill_finished = False
        self.decode_finished = False
        self.prefill_doc = None
        self.held = []
        self.held_bytes = 0
        self.held_back = False
        self.sse_rest = b""
        self.decode_head = None
        body = bootstrap_body(req.body, self.merge_into, self.empty_body, pw.host, pw.bootstrap_port, self.batch)
        start = b"POST " + req.url + b" HTTP/1.1\r\n"
        client_auth = b"authorization: " + req.authorization + b"\r\n" if req.authorization is not None else b""
        if pw.dp_rank < 0 and dw.dp_rank < 0:
            head = forwarded_head(req, PyBytes_GET_SIZE(body))
            pbody = dbody = body
            phead = dhead = head
        else:
            # --dp-aware: each side names its own rank
            pbody = with_dp_rank(body, pw.dp_rank) if pw.dp_rank >= 0 else body
            dbody = with_dp_rank(body, dw.dp_rank) if dw.dp_rank >= 0 else body
            phead = forwarded_head(req, PyBytes_GET_SIZE(pbody))
            dhead = forwarded_head(req, PyBytes_GET_SIZE(dbody))
        prefill = new_leg(self, pw, start + pw.host_header + (pw.auth_header or client_auth) + phead, pbody, True)
        decode = new_leg(self, dw, start + dw.host_header + (dw.auth_header or client_auth) + dhead, dbody,
                         self.logprobs or req.http_minor == 0)
        # a prefill worker answers when its prefill is done (that leg's
        # queued prefill lasts until then); the decode side prefills nothing
        decode.unqueue_prefill()
        self.prefill = prefill
        self.decode = decode
        self.relaying = decode
        prefill.begin()
        if not self.done:
            decode.begin()
        return 0

    cdef int end_legs(self, int how) except -1:
        if self.prefill is not None:
            self.prefill.end(how)
        if self.decode is not None:
            self.decode.end(how)
        return 0

    cdef str side(self, Leg leg):
        return "prefill" if leg is self.prefill else "decode"

    # --- the legs report here ---

    cdef int leg_head(self, Leg leg, ResponseParser p, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        cdef int status = p.status
        leg.worker.record_outcome(not failure_status(status), monotonic())
        if self.done:
            return 0  # a leg left to finish after the client's answer (Leg.end)
        if status < 200 or status >= 300:
            if retryable_status(status) and self.can_retry():
                self.retry_pair(leg, f"worker answered {status}")
                return 0
            # collect the error to report it when it is complete
            leg.collecting = True
            if n:
                leg.parts.append(data[off:off + n])
            if leg is self.prefill and self.head_sent:
                self.abort_client("prefill failed after decode began streaming")
            else:
                (self.decode if leg is self.prefill else self.prefill).end(LEG_STOP)
            return 0
        if leg is self.prefill:
            if self.logprobs:
                leg.collecting = True
                if n:
                    leg.parts.append(data[off:off + n])
            return 0
        # decode
        if self.logprobs:
            self.status = status
            self.decode_head = p
            if n:
                self.leg_body(leg, data, off, n)
            return 0
        self.relay(self.response_head(p, leg.worker, leg.decoded), data, off, n)
        return 0

    cdef int leg_body(self, Leg leg, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        if leg is self.prefill or self.done:
            return 0  # prefill's body is not for the client
        if not self.logprobs:
            self.relay(None, data, off, n)
            return 0
        self.held.append(data[off:off + n])
        self.held_bytes += n
        if self.stream and self.prefill_finished:
            self.flush_stream()
        elif not self.prefill_finished and self.held_bytes > PD_HOLD_BYTES:
            # prefill has not answered yet: hold no more of decode's answer
            # (the decode worker waits, its connection unread)
            self.held_back = True
            leg.pause_reading()
        return 0

    cdef int leg_done(self, Leg leg) except -1:
        if self.done:
            return 0
        if leg.collecting and (leg.status < 200 or leg.status >= 300):
            self.report_error(leg)
            return 0
        if leg is self.prefill:
            self.prefill_finished = True
            if self.held_back:
                self.held_back = False
                if not self.cycle.flow.write_paused:
                    self.decode.resume_reading()
            if self.logprobs:
                self.prefill_doc = prefill_document(b"".join(leg.parts))
                leg.parts = []
                if self.stream:
                    if self.decode_head is not None:
                        self.flush_stream()
                    if self.decode_finished:
                        self.finish_stream()
                elif self.decode_finished:
                    self.send_merged()
            return 0
        self.decode_finished = True
        if not self.logprobs:
            self.end_relay()
        elif self.prefill_finished:
            if self.stream:
                self.flush_stream()
                self.finish_stream()
            else:
                self.send_merged()
        return 0

    cdef int leg_failed(self, Leg leg, object exc, int stage) except -1:
        cdef str side = self.side(leg)
        if self.done:
            return 0
        if self.head_sent:
            if leg is self.decode or not self.decode_finished:
                self.abort_client(f"{side} worker {leg.worker.url} failed mid-response: {exc}")
            return 0
        if self.can_retry():
            self.retry_pair(leg, f"{side} worker {leg.worker.url}: {exc}")
            return 0
        code = "worker_unreachable" if stage == FAIL_CONNECT else "upstream_error"
        self.fail_to_client(502, code, f"The {side} worker {leg.worker.url} failed: {exc}")
        return 0

    # --- logprob merging ---

    cdef int send_merged(self) except -1:
        try:
            decoded = orjson.loads(b"".join(self.held))
            body = orjson.dumps(merge_logprobs(self.prefill_doc, decoded))
        except orjson.JSONDecodeError:
            body = b"".join(self.held)
        self.cycle.write(self.response_head(self.decode_head, self.decode.worker, True, len(body)) + body)
        self.complete(None)
        return 0

    cdef int flush_stream(self) except -1:
        """Write the held decode events with prefill's logprobs merged in."""
        cdef bytes data = self.sse_rest + b"".join(self.held)
        cdef list out = []
        cdef Py_ssize_t end
        cdef bytes head = None
        self.held = []
        self.held_bytes = 0
        if not self.head_sent:
            head = self.response_head(self.decode_head, self.decode.worker, True, -2)
        while True:
            end = data.find(b"\n\n")
            if end < 0:
                break
            event = data[:end + 2]
            data = data[end + 2:]
            if event.startswith(b"data: {"):
                try:
                    doc = orjson.loads(event[6:end])
                    event = b"data: " + orjson.dumps(merge_logprobs(self.prefill_doc, doc)) + b"\n\n"
                except orjson.JSONDecodeError:
                    pass
            out.append(event)
        self.sse_rest = data
        payload = b"".join(out)
        self.relay(head, payload, 0, PyBytes_GET_SIZE(payload))
        return 0

    cdef int finish_stream(self) except -1:
        if self.sse_rest:
            self.relay(None, self.sse_rest, 0, PyBytes_GET_SIZE(self.sse_rest))
            self.sse_rest = b""
        self.end_relay()
        return 0

    # --- retries and errors ---

    cdef int retry_pair(self, Leg failed, str why) except -1:
        if failed is self.prefill:
            self.failed_prefill = failed.worker
        else:
            self.failed_decode = failed.worker
        self.end_legs(LEG_STOP)  # the failure is on record already
        _log.debug("PD request %s: %s; retrying with a new pair", self.req.request_id, why)
        self.retry(failed.worker)
        return 0

    cdef int report_error(self, Leg leg) except -1:
        cdef str side = self.side(leg)
        detail = b"".join(leg.parts)[:1000].decode("utf-8", "replace")
        self.end_legs(LEG_STOP)
        if self.head_sent:
            self.abort_client(f"{side} failed with {leg.status}")
            return 0
        status = leg.status if 400 <= leg.status < 600 else 502
        self.fail_to_client(status, f"{side}_failed",
                            f"The {side} worker {leg.worker.url} answered {leg.status}: {detail}")
        return 0

    cdef int abort_client(self, str why) except -1:
        _log.warning("PD request %s: %s", self.req.request_id, why)
        self.break_stream(502, "upstream_error", why)
        return 0

    cdef int drop_buffers(self) except -1:
        self.held = []
        self.held_bytes = 0
        self.sse_rest = b""
        self.prefill_doc = None
        self.decode_head = None
        if self.prefill is not None:
            self.prefill.parts = []
        if self.decode is not None:
            self.decode.parts = []
        return 0

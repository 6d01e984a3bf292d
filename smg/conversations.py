"""The OpenAI Conversations API, kept in the gateway's memory
(--history-backend memory, the default): conversations and their items,
created, read, listed, updated and deleted by clients.

The store lives in the control plane, so with --workers N every
data-plane process forwards these routes to the one store. It is bounded:
at most --history-memory-max-items items in all (a conversation counts as
one more), conversations unused for --history-memory-retention-secs are
dropped, and when the budget is full the least recently used conversation
goes first. Nothing survives a restart.

Routes (the reference's shapes and errors):
  POST   /v1/conversations                       {"items"?, "metadata"?}
  GET    /v1/conversations/{id}
  POST   /v1/conversations/{id}                  {"metadata"}
  DELETE /v1/conversations/{id}
  GET    /v1/conversations/{id}/items            ?limit=&order=asc|desc&after=
  POST   /v1/conversations/{id}/items            {"items": [...]}
  GET    /v1/conversations/{id}/items/{item_id}
  DELETE /v1/conversations/{id}/items/{item_id}
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Any, Optional
from urllib.parse import parse_qs

import orjson

from smg._fast.routes import Response, error_response, json_response

MAX_ITEMS_PER_REQUEST = 20          # OpenAI's limit on items added at once
MAX_METADATA_PAIRS = 16
MAX_LIST_LIMIT = 100
ITEM_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


class Conversation:
    __slots__ = ("id", "created_at", "metadata", "items", "last_used")

    def __init__(self, conv_id: str, metadata: dict, now: float):
        self.id = conv_id
        self.created_at = int(time.time())
        self.metadata = metadata
        self.items: OrderedDict[str, dict] = OrderedDict()
        self.last_used = now

    def public(self) -> dict:
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}


class BadRequest(Exception):
    pass


class ConversationStore:
    def __init__(self, max_items: int = 100_000, retention_secs: float = 86400.0):
        self.max_items = max_items
        self.retention_secs = retention_secs
        self.conversations: OrderedDict[str, Conversation] = OrderedDict()   # least recently used first
        self.size = 0                                                          # items + conversations
        self.evicted = 0

    def _touch(self, conv: Conversation, now: float) -> None:
        conv.last_used = now
        self.conversations.move_to_end(conv.id)

    def get(self, conv_id: str, now: float) -> Optional[Conversation]:
        self.expire(now)
        conv = self.conversations.get(conv_id)
        if conv is not None:
            self._touch(conv, now)
        return conv

    def expire(self, now: float) -> None:
        while self.conversations:
            oldest = next(iter(self.conversations.values()))
            if now - oldest.last_used < self.retention_secs:
                break
            self.delete(oldest.id)
            self.evicted += 1

    def _make_room(self, needed: int, keep: Optional[Conversation] = None) -> None:
        if needed > self.max_items:
            raise BadRequest(f"the conversation store holds at most {self.max_items} items "
                             "(--history-memory-max-items)")
        while self.size + needed > self.max_items:
            victim = next((c for c in self.conversations.values() if c is not keep), None)
            if victim is None:
                raise BadRequest("the conversation is too large for the store (--history-memory-max-items)")
            self.delete(victim.id)
            self.evicted += 1

    def create(self, metadata: dict, items: list[dict], now: float) -> Conversation:
        self.expire(now)
        self._make_room(1 + len(items))
        conv = Conversation("conv_" + secrets.token_hex(25), metadata, now)
        self.conversations[conv.id] = conv
        self.size += 1
        for item in items:
            self._add_item(conv, item)
        return conv

    def add_items(self, conv: Conversation, items: list[dict], now: float) -> list[dict]:
        self._make_room(len(items), keep=conv)
        self._touch(conv, now)
        return [self._add_item(conv, item) for item in items]

    def _add_item(self, conv: Conversation, item: dict) -> dict:
        stored = dict(item)
        kind = stored.get("type", "message")
        stored["type"] = kind
        item_id = stored.get("id")
        if not isinstance(item_id, str) or not item_id or item_id in conv.items:
            item_id = ITEM_PREFIXES.get(kind, "item_") + secrets.token_hex(25)
        stored["id"] = item_id
        if kind == "message":
            content = stored.get("content")
            if isinstance(content, str):  # the shorthand: one text part
                part = "output_text" if stored.get("role") == "assistant" else "input_text"
                stored["content"] = [{"type": part, "text": content}]
            stored.setdefault("status", "completed")
        conv.items[item_id] = stored
        self.size += 1
        return stored

    def delete_item(self, conv: Conversation, item_id: str) -> bool:
        if conv.items.pop(item_id, None) is None:
            return False
        self.size -= 1
        return True

    def delete(self, conv_id: str) -> bool:
        conv = self.conversations.pop(conv_id, None)
        if conv is None:
            return False
        self.size -= 1 + len(conv.items)
        return True


def _metadata(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("metadata must be an object")
    if len(value) > MAX_METADATA_PAIRS:
        raise BadRequest(f"metadata has at most {MAX_METADATA_PAIRS} keys")
    for k, v in value.items():
        if not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise BadRequest("metadata maps keys of at most 64 characters to strings of at most 512")
    return value


def _items(value: Any, required: bool) -> list[dict]:
    if value is None:
        if required:
            raise BadRequest("'items' is required")
        return []
    if not isinstance(value, list) or not all(isinstance(i, dict) for i in value):
        raise BadRequest("items must be a list of objects")
    if required and not value:
        raise BadRequest("'items' must not be empty")
    if len(value) > MAX_ITEMS_PER_REQUEST:
        raise BadRequest(f"at most {MAX_ITEMS_PER_REQUEST} items may be added at once")
    for item in value:
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise BadRequest("an item's 'type' must be a string")
        if kind == "message" and item.get("role") not in ("user", "assistant", "system", "developer"):
            raise BadRequest("a message item needs a 'role' (user, assistant, system or developer)")
    return value


def _body(req) -> dict:
    try:
        doc = orjson.loads(req.body) if req.body else {}
    except orjson.JSONDecodeError as e:
        raise _JsonError(f"Failed to parse the request body as JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("The request body must be a JSON object")
    return doc


class _JsonError(Exception):
    pass


def _not_found(message: str) -> Response:
    return error_response(404, "not_found", message)


class ConversationRoutes:
    """The handlers of /v1/conversations and /v1/conversations/... ."""

    def __init__(self, store: Optional[ConversationStore]):
        self.store = store      # None: --history-backend none

    def root(self, req) -> Response:
        if req.method != b"POST":
            return error_response(405, "method_not_allowed", f"Invalid URL ({req.method.decode()} {req.path})",
                                  headers=b"allow: POST\r\n")
        return self._guarded(self._create, req)

    def item(self, req) -> Response:
        return self._guarded(self._dispatch, req)

    def _guarded(self, handler, req) -> Response:
        if self.store is None:
            return error_response(501, "conversations_disabled",
                                  "Conversations are not stored (--history-backend none)")
        try:
            return handler(req)
        except _JsonError as e:
            return error_response(400, "json_parse_error", str(e))
        except BadRequest as e:
            return error_response(400, "invalid_request", str(e))

    def _create(self, req) -> Response:
        doc = _body(req)
        conv = self.store.create(_metadata(doc.get("metadata")), _items(doc.get("items"), False),
                                 time.monotonic())
        return json_response(conv.public())

    def _dispatch(self, req) -> Response:
        parts = req.path[len("/v1/conversations/"):].split("/")
        method = req.method.decode()
        conv_id = parts[0]
        if not conv_id or len(parts) > 3 or (len(parts) >= 2 and parts[1] != "items") or \
                (len(parts) == 3 and not parts[2]):
            return error_response(404, "unknown_url", f"Invalid URL ({method} {req.path})")
        allowed = (("GET", "POST", "DELETE"), ("GET", "POST"), ("GET", "DELETE"))[len(parts) - 1]
        if method not in allowed:
            return error_response(405, "method_not_allowed", f"Invalid URL ({method} {req.path})",
                                  headers=b"allow: " + ", ".join(allowed).encode() + b"\r\n")
        now = time.monotonic()
        store = self.store
        conv = store.get(conv_id, now)
        if conv is None:
            return _not_found("Conversation not found")
        if len(parts) == 1:
            if method == "GET":
                return json_response(conv.public())
            if method == "DELETE":
                store.delete(conv.id)
                return json_response({"id": conv.id, "object": "conversation.deleted", "deleted": True})
            doc = _body(req)
            if "metadata" not in doc:
                raise BadRequest("'metadata' is required")
            conv.metadata = _metadata(doc["metadata"])
            return json_response(conv.public())
        if len(parts) == 2:
            if method == "POST":
                added = store.add_items(conv, _items(_body(req).get("items"), True), now)
                return json_response(_listing(added, False))
            return self._list(req, conv)
        item = conv.items.get(parts[2])
        if item is None:
            return _not_found("Item not found in this conversation")
        if method == "GET":
            return json_response(item)
        store.delete_item(conv, parts[2])
        return json_response(conv.public())

    def _list(self, req, conv: Conversation) -> Response:
        query = parse_qs(req.query.decode("latin-1")) if req.query else {}
        try:
            limit = int(query.get("limit", ["20"])[0])
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        order = query.get("order", ["desc"])[0]
        if order not in ("asc", "desc"):
            raise BadRequest("order must be 'asc' or 'desc'")
        items = list(conv.items.values())
        if order == "desc":
            items.reverse()
        after = query.get("after", [None])[0]
        if after is not None:
            ids = [i["id"] for i in items]
            if after not in ids:
                raise BadRequest(f"no item {after!r} in this conversation")
            items = items[ids.index(after) + 1:]
        return json_response(_listing(items[:limit], len(items) > limit))


def _listing(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}

"""/v1/conversations: the OpenAI Conversations API, stored in the gateway's
memory (the control plane's, shared by every data-plane process)."""

import openai
import pytest

from helpers import request
from smg.conversations import BadRequest, ConversationStore


def client(g):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{g.port}/v1", api_key="none", max_retries=0, timeout=10)


def test_the_openai_client_manages_conversations_and_items(gateway):
    g = gateway([])
    c = client(g)
    conv = c.conversations.create(metadata={"topic": "billing"},
                                  items=[{"type": "message", "role": "user", "content": "hello"}])
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "billing"}
    assert c.conversations.retrieve(conv.id).id == conv.id
    assert c.conversations.update(conv.id, metadata={"topic": "refunds"}).metadata == {"topic": "refunds"}
    added = c.conversations.items.create(conv.id, items=[
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
        {"type": "message", "role": "user", "content": "thanks"}])
    assert len(added.data) == 2
    listed = c.conversations.items.list(conv.id, order="asc")
    texts = [item.content[0].text for item in listed.data]
    assert texts == ["hello", "hi", "thanks"]
    page = c.conversations.items.list(conv.id, order="asc", limit=1, after=listed.data[0].id)
    assert [i.id for i in page.data] == [listed.data[1].id] and page.has_more
    one = c.conversations.items.retrieve(listed.data[2].id, conversation_id=conv.id)
    assert one.content[0].text == "thanks"
    c.conversations.items.delete(listed.data[2].id, conversation_id=conv.id)
    assert len(c.conversations.items.list(conv.id).data) == 2
    deleted = c.conversations.delete(conv.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        c.conversations.retrieve(conv.id)


def test_bad_input_is_refused_and_changes_nothing(gateway):
    g = gateway([])
    conv = g.post("/v1/conversations", {"metadata": {"a": "1"}}).json()
    path = f"/v1/conversations/{conv['id']}"
    for body in (b"{not json", {"metadata": "x"}, {"metadata": {"k": 5}}):
        r = g.post(path, body)
        assert r.status == 400, body
    for body in ({"items": "x"}, {"items": []}, {"items": [{"type": "message", "content": "no role"}]},
                 {"items": [{"type": "message", "role": "user", "content": "x"}] * 21}):
        r = g.post(path + "/items", body)
        assert r.status == 400, body
    assert g.get(path).json()["metadata"] == {"a": "1"}
    assert g.get(path + "/items").json()["data"] == []
    for method, p, status in (("GET", "/v1/conversations/conv_nope", 404), ("GET", path + "/items/msg_nope", 404),
                              ("PUT", path, 405), ("GET", path + "/other", 404),
                              ("GET", path + "/items?limit=0", 400), ("GET", path + "/items?order=up", 400)):
        r = request(g.port, method, p)
        assert r.status == status, (method, p)
    assert g.get("/v1/conversations/conv_nope").json()["error"]["code"] == "not_found"


def test_with_several_processes_every_process_sees_one_store(gateway):
    g = gateway(["--workers", "2"])
    ids = [g.post("/v1/conversations", {"metadata": {"n": str(i)}}).json()["id"] for i in range(10)]
    # new connections land on either process; each answers from the same store
    for conv_id in ids * 2:
        assert g.get(f"/v1/conversations/{conv_id}").status == 200


def test_history_backend_none_stores_nothing_and_says_so(gateway):
    g = gateway(["--history-backend", "none"])
    r = g.post("/v1/conversations", {})
    assert r.status == 501 and r.json()["error"]["code"] == "conversations_disabled"


def test_the_store_is_bounded_by_items_and_drops_the_least_recently_used():
    store = ConversationStore(max_items=10, retention_secs=100.0)
    a = store.create({}, [{"role": "user", "content": "x"}] * 3, now=0.0)      # 4 of 10
    b = store.create({}, [{"role": "user", "content": "x"}] * 3, now=1.0)      # 8 of 10
    store.get(a.id, now=2.0)                                                    # a is the more recent
    store.create({}, [{"role": "user", "content": "x"}] * 2, now=3.0)          # needs 3: b goes
    assert store.get(b.id, now=4.0) is None and store.get(a.id, now=4.0) is a
    assert store.size <= 10 and store.evicted == 1
    with pytest.raises(BadRequest):
        store.create({}, [{"role": "user", "content": "x"}] * 10, now=5.0)     # larger than the store
    # unused for the retention period: dropped
    assert store.get(a.id, now=150.0) is None
    assert store.size == 0 and not store.conversations

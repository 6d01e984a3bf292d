# cython: language_level=3
"""The text a routing policy keys on, per endpoint, taken from the
request's parsed JSON body. Values of the wrong type contribute nothing:
routing never fails because of the body's shape (the worker validates it)."""

ENDPOINTS = {
    "/generate": EP_GENERATE,
    "/v1/chat/completions": EP_CHAT,
    "/v1/completions": EP_COMPLETIONS,
    "/v1/embeddings": EP_EMBEDDINGS,
    "/v1/rerank": EP_RERANK,
    "/rerank": EP_RERANK,
    "/v1/classify": EP_CLASSIFY,
    "/v1/responses": EP_RESPONSES,
    "/v1/messages": EP_MESSAGES,
    "/v1/messages/count_tokens": EP_COUNT_TOKENS,
}
ENDPOINT_NAMES = {
    EP_GENERATE: "generate",
    EP_CHAT: "chat",
    EP_COMPLETIONS: "completions",
    EP_EMBEDDINGS: "embeddings",
    EP_RERANK: "rerank",
    EP_CLASSIFY: "classify",
    EP_RESPONSES: "responses",
    EP_MESSAGES: "messages",
    EP_COUNT_TOKENS: "count_tokens",
}


cdef str _join_texts(object value):
    """A string, or a list of strings (and of lists of them), joined by spaces."""
    cdef list parts
    if type(value) is str:
        return <str>value
    if type(value) is list:
        parts = []
        for item in <list>value:
            if type(item) is str:
                parts.append(item)
            elif type(item) is list:
                parts.append(_join_texts(item))
        return " ".join(parts)
    return ""


cdef str _ids_text(object value):
    """input_ids as decimal numbers joined by spaces (nested lists flattened)."""
    cdef list parts
    if type(value) is list:
        parts = []
        for item in <list>value:
            if type(item) is int:
                parts.append(str(item))
            elif type(item) is list:
                parts.append(_ids_text(item))
        return " ".join(parts)
    return ""


cdef str _content_text(object content):
    """A chat message's content: a string, or a list of parts of which the
    text parts count."""
    cdef list parts
    if type(content) is str:
        return <str>content
    if type(content) is list:
        parts = []
        for part in <list>content:
            if type(part) is dict:
                t = (<dict>part).get("text")
                kind = (<dict>part).get("type", "text")
                if type(t) is str and (kind == "text" or kind == "input_text"):
                    parts.append(t)
            elif type(part) is str:
                parts.append(part)
        return " ".join(parts)
    return ""


cdef str _chat_text(object messages):
    cdef list parts = []
    cdef str t
    if type(messages) is not list:
        return ""
    for msg in <list>messages:
        if type(msg) is not dict:
            continue
        t = _content_text((<dict>msg).get("content"))
        if t:
            parts.append(t)
        r = (<dict>msg).get("reasoning_content")
        if type(r) is str and r:
            parts.append(<str>r)
    return " ".join(parts)


cpdef str routing_text(int endpoint, dict body):
    if endpoint == EP_GENERATE:
        text = body.get("text")
        if text is not None:
            return _join_texts(text)
        ids = body.get("input_ids")
        if ids is not None:
            return _ids_text(ids)
        return ""
    if endpoint == EP_CHAT:
        return _chat_text(body.get("messages"))
    if endpoint == EP_COMPLETIONS:
        return _join_texts(body.get("prompt"))
    if endpoint == EP_EMBEDDINGS or endpoint == EP_CLASSIFY:
        v = body.get("input")
        if v is None:
            v = body.get("text")
        return _join_texts(v)
    if endpoint == EP_RERANK:
        return _join_texts(body.get("query"))
    if endpoint == EP_RESPONSES:
        return _responses_text(body)
    if endpoint == EP_MESSAGES or endpoint == EP_COUNT_TOKENS:
        return _messages_text(body)
    return ""


cdef str _responses_text(dict body):
    """The Responses API: the instructions, then the input (a string, or a
    list of message items whose content counts)."""
    cdef list parts = []
    instructions = body.get("instructions")
    if type(instructions) is str and instructions:
        parts.append(instructions)
    items = body.get("input")
    if type(items) is str:
        parts.append(items)
    elif type(items) is list:
        t = _chat_text(items)
        if t:
            parts.append(t)
    return " ".join(parts)


cdef str _messages_text(dict body):
    """The Anthropic Messages API: the system prompt (a string or text
    blocks), then the messages' content."""
    cdef str system = _content_text(body.get("system"))
    cdef str chat = _chat_text(body.get("messages"))
    if system and chat:
        return system + " " + chat
    return system or chat


cdef inline bint _is_str_list(object v):
    if type(v) is not list:
        return False
    for item in <list>v:
        if type(item) is not str:
            return False
    return True


cdef inline bint _is_int_list(object v):
    if type(v) is not list:
        return False
    for item in <list>v:
        if type(item) is not int:
            return False
    return True


cdef tuple _missing(str param):
    return ("missing_required_parameter", param, f"'{param}' is required")


cdef tuple _wrong(str param, str what):
    return ("invalid_type", param, f"'{param}' must be {what}")


cpdef tuple invalid_field(int endpoint, dict body):
    """(error code, parameter, message) when a field the gateway relies on is
    missing or of the wrong type, else None; the codes are OpenAI's
    (missing_required_parameter, invalid_type). Only shapes are checked;
    the worker validates the rest."""
    v = body.get("stream")
    if v is not None and type(v) is not bool:
        return _wrong("stream", "a boolean")
    if endpoint == EP_GENERATE:
        text = body.get("text")
        if text is not None and type(text) is not str and not _is_str_list(text):
            return _wrong("text", "a string or a list of strings")
        ids = body.get("input_ids")
        if ids is not None and not _is_int_list(ids):
            if type(ids) is not list:
                return _wrong("input_ids", "a list of integers or a list of such lists")
            for x in <list>ids:
                if not _is_int_list(x):
                    return _wrong("input_ids", "a list of integers or a list of such lists")
        return None
    if endpoint == EP_CHAT:
        msgs = body.get("messages")
        if msgs is None:
            return _missing("messages")
        if type(msgs) is not list:
            return _wrong("messages", "a list of message objects")
        for m in <list>msgs:
            if type(m) is not dict:
                return _wrong("messages", "a list of message objects")
            content = (<dict>m).get("content")
            if content is not None and type(content) is not str and type(content) is not list:
                return _wrong("messages", "a list of messages whose 'content' is a string or a list of parts")
        return None
    if endpoint == EP_COMPLETIONS:
        prompt = body.get("prompt")
        if prompt is None:
            return _missing("prompt")
        if type(prompt) is not str and type(prompt) is not list:
            return _wrong("prompt", "a string, a list of strings or a list of token ids")
        return None
    if endpoint == EP_EMBEDDINGS or endpoint == EP_CLASSIFY:
        v = body.get("input")
        if v is None:
            v = body.get("text")
        if v is None:
            return _missing("input")
        if type(v) is not str and type(v) is not list:
            return _wrong("input", "a string or a list")
        return None
    if endpoint == EP_RESPONSES:
        v = body.get("input")
        if v is not None and type(v) is not str and type(v) is not list:
            return _wrong("input", "a string or a list of input items")
        return None
    if endpoint == EP_MESSAGES or endpoint == EP_COUNT_TOKENS:
        return _invalid_messages(endpoint, body)
    if endpoint == EP_RERANK:
        q = body.get("query")
        if q is None:
            return _missing("query")
        if type(q) is not str:
            return _wrong("query", "a string")
        docs = body.get("documents")
        if docs is not None and type(docs) is not list:
            return _wrong("documents", "a list")
    return None


cdef tuple _invalid_messages(int endpoint, dict body):
    """The Messages API's required fields (the reference checks the same
    before routing): model, messages (a non-empty list of user/assistant
    turns) and, to create a message, max_tokens."""
    if body.get("model") is None:
        return _missing("model")
    msgs = body.get("messages")
    if msgs is None or (type(msgs) is list and not msgs):
        return ("missing_required_parameter", "messages", "'messages' is required and cannot be empty")
    if type(msgs) is not list:
        return _wrong("messages", "a list of message objects")
    for m in <list>msgs:
        if type(m) is not dict:
            return _wrong("messages", "a list of message objects")
        role = (<dict>m).get("role")
        if role != "user" and role != "assistant" and role != "system":
            return ("invalid_value", "messages", "every message's 'role' must be 'user' or 'assistant'")
        content = (<dict>m).get("content")
        if type(content) is not str and type(content) is not list:
            return _wrong("messages", "a list of messages whose 'content' is a string or a list of blocks")
    if endpoint == EP_MESSAGES:
        v = body.get("max_tokens")
        if v is None:
            return _missing("max_tokens")
        if type(v) is not int:
            return _wrong("max_tokens", "an integer")
    return None


# precise routing (--kv-events-port): whether requests say if their routing
# text is the prompt the engine tokenizes, and, for a model that ships a
# chat template, body -> the prompt the engine makes of a chat request's
# messages (None: it could not be rendered); see set_precise
cdef bint _precise = False
cdef object _chat_renderer = None


def set_precise(bint on, renderer=None):
    """Precise routing on or off; `renderer`: a chat template's (None: none)."""
    global _precise, _chat_renderer
    _precise = on
    _chat_renderer = renderer


cdef str routing_prompt(int endpoint, dict body, bint* is_prompt):
    """The routing text, and in is_prompt whether it is the prompt as the
    engine tokenizes it: a /generate "text" or /v1/completions "prompt"
    string, or a chat's messages rendered through the model's chat template
    (set_precise). Token ids, and chats without a template, are not; without
    precise routing nothing is (and nothing more is spent)."""
    cdef object text
    is_prompt[0] = False
    if not _precise:
        return routing_text(endpoint, body)
    if endpoint == EP_CHAT and _chat_renderer is not None:
        text = _chat_renderer(body)
        if text is not None:
            is_prompt[0] = True
            return <str>text
    text = routing_text(endpoint, body)
    if endpoint == EP_GENERATE:
        is_prompt[0] = type(body.get("text")) is str and body.get("input_ids") is None
    elif endpoint == EP_COMPLETIONS:
        is_prompt[0] = type(body.get("prompt")) is str
    return <str>text


def routing_prompt_py(int endpoint, dict body):
    """(routing text, is_prompt): routing_prompt for tests."""
    cdef bint is_prompt = False
    text = routing_prompt(endpoint, body, &is_prompt)
    return text, is_prompt

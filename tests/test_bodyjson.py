"""The large-body JSON reader (smg._fast.bodyjson) against orjson: on any
input, the same value (same types, same key order, the sign of a zero) or
the same error. `large=0` sends every body through the reader."""

import json
import math

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smg._fast.bodyjson import parse_json

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(a, b) -> bool:
    """Equal, with the same types, key order and signs of zero (iterative:
    the documents nest deeper than Python's recursion limit)."""
    pending = [(a, b)]
    while pending:
        a, b = pending.pop()
        if type(a) is not type(b):
            return False
        if type(a) is float:
            if math.copysign(1.0, a) != math.copysign(1.0, b) or a != b:
                return False
        elif type(a) is dict:
            if list(a) != list(b):
                return False
            pending.extend((a[k], b[k]) for k in a)
        elif type(a) is list:
            if len(a) != len(b):
                return False
            pending.extend(zip(a, b))
        elif a != b:
            return False
    return True


def outcome(parse, body: bytes):
    try:
        return ("value", parse(body))
    except orjson.JSONDecodeError as e:
        return ("error", str(e))


def assert_like_orjson(body: bytes) -> None:
    want = outcome(orjson.loads, body)
    got = outcome(lambda b: parse_json(b, 0), body)
    assert want[0] == got[0], (body[:200], want, got)
    if want[0] == "value":
        assert same(want[1], got[1]), (body[:200], want, got)
    else:
        assert want[1] == got[1]  # orjson's own message: the reader left the body to it


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30)


@FUZZ
@given(json_values, st.booleans(), st.sampled_from([None, 0, 2]))
def test_any_document_reads_as_orjson_reads_it(value, ascii_only, indent):
    assert_like_orjson(json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode())


@FUZZ
@given(json_values, st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 3), st.binary(max_size=3)),
                            min_size=1, max_size=4))
def test_a_damaged_document_reads_as_orjson_reads_it(value, edits):
    """Bytes replaced, cut or inserted anywhere: broken UTF-8, stray
    escapes, control characters, truncation, trailing data."""
    body = bytearray(json.dumps(value, ensure_ascii=False).encode())
    for at, cut, data in edits:
        at %= len(body) + 1
        body[at:at + cut] = data
    assert_like_orjson(bytes(body))


@pytest.mark.parametrize("body", [
    b'"\\ud83d\\ude00 \\u00e9 \\u20ac \xf0\x9f\x98\x80 \xc3\xa9"',  # pairs, escapes, raw UTF-8 of each width
    b'"\\ud800"', b'"\\udc00"', b'"\\ud800\\u0041"',              # lone surrogates: orjson judges
    b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'"\xf4\x90\x80\x80"',      # surrogate, overlong, past U+10FFFF
    b'"\\u0000\x7f"', b'"a\x1fb"', b'"\\x"', b'"\\u12"',
    b'9223372036854775807', b'-9223372036854775808', b'18446744073709551615', b'18446744073709551616',
    b'123456789012345678', b'-0', b'-0.0', b'1e400', b'-1e400', b'1e-400', b'0.1', b'1.', b'.5', b'01', b'-',
    b'[1,]', b'{"a":1,}', b'{"a" 1}', b'{"a":1,"a":2,"b":3}', b'[' * 1100 + b']' * 1100, b'[' * 900 + b']' * 900,
    b'\xef\xbb\xbf{}', b' \t\r\n{} \n', b'{} {}', b'', b'nul', b'truex', b'[true,false,null]',
])
def test_edge_cases_read_as_orjson_reads_them(body):
    assert_like_orjson(body)


def test_a_large_body_is_read_by_the_reader_and_a_small_one_by_orjson():
    prompt = "line one\nline two \u00e9\u20ac\U0001F600 " + "x" * (2 << 20)
    body = orjson.dumps({"model": "m", "text": prompt, "stream": True, "max_new_tokens": 16, "temperature": 0.5})
    assert parse_json(body) == {"model": "m", "text": prompt, "stream": True, "max_new_tokens": 16,
                                "temperature": 0.5}
    with pytest.raises(orjson.JSONDecodeError):
        parse_json(body[:-1])  # cut short: orjson's error
    assert parse_json(b'{"text": "small"}') == {"text": "small"}

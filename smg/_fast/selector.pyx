# cython: language_level=3
"""Kubernetes label selectors: parsing and matching.

Full equality- and set-based syntax, as `kubectl -l` accepts it:
    k=v   k==v   k!=v   k in (a,b)   k notin (a,b)   k   !k
joined by commas. A Selector is the AND of its requirements."""

import re

cdef enum:
    OP_EQ = 0
    OP_NE = 1
    OP_IN = 2
    OP_NOTIN = 3
    OP_EXISTS = 4
    OP_NOT_EXISTS = 5

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY_RE = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^({_NAME})?$")


class SelectorError(ValueError):
    pass


def _check_key(str key, str text):
    if not key:
        raise SelectorError(f"{text!r}: missing label key")
    if not _KEY_RE.match(key):
        raise SelectorError(f"{text!r}: invalid label key {key!r}")
    prefix, _, _ = key.rpartition("/")
    if len(prefix) > 253:
        raise SelectorError(f"{text!r}: label key prefix longer than 253 characters")


def _check_value(str value, str text):
    if len(value) > 63 or not _VALUE_RE.match(value):
        raise SelectorError(f"{text!r}: invalid label value {value!r}")


cdef class Requirement:
    cdef readonly int op
    cdef readonly str key
    cdef readonly str value
    cdef readonly frozenset values

    def __init__(self, int op, str key, str value=None, values=None):
        self.op = op
        self.key = key
        self.value = value
        self.values = frozenset(values) if values is not None else None

    cdef bint matches(self, dict labels):
        v = labels.get(self.key)
        if self.op == OP_EQ:
            return v is not None and v == self.value
        if self.op == OP_NE:
            return v is None or v != self.value
        if self.op == OP_IN:
            return v is not None and v in self.values
        if self.op == OP_NOTIN:
            return v is None or v not in self.values
        if self.op == OP_EXISTS:
            return self.key in labels
        return self.key not in labels

    def __str__(self):
        if self.op == OP_EQ:
            return f"{self.key}={self.value}"
        if self.op == OP_NE:
            return f"{self.key}!={self.value}"
        if self.op == OP_IN:
            return f"{self.key} in ({','.join(sorted(self.values))})"
        if self.op == OP_NOTIN:
            return f"{self.key} notin ({','.join(sorted(self.values))})"
        if self.op == OP_EXISTS:
            return self.key
        return f"!{self.key}"

    def __eq__(self, other):
        return isinstance(other, Requirement) and str(self) == str(other)

    def __hash__(self):
        return hash(str(self))

    def __repr__(self):
        return f"Requirement({str(self)!r})"


cdef class Selector:
    """The AND of requirements. An empty selector matches everything."""
    cdef readonly tuple requirements

    def __init__(self, requirements=()):
        self.requirements = tuple(requirements)

    cpdef bint matches(self, labels):
        cdef Requirement r
        cdef dict d = labels if type(labels) is dict else dict(labels or {})
        for r in self.requirements:
            if not r.matches(d):
                return False
        return True

    def __str__(self):
        return ",".join(str(r) for r in self.requirements)

    def __repr__(self):
        return f"Selector({str(self)!r})"

    def __bool__(self):
        return bool(self.requirements)

    def common(self, Selector other):
        """The requirements both selectors have, in this one's order."""
        theirs = set(other.requirements)
        return Selector([r for r in self.requirements if r in theirs])


def _split_top_level(str text):
    """Split on commas that are not inside parentheses."""
    parts = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
            if depth > 1:
                raise SelectorError(f"{text!r}: nested parentheses")
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"{text!r}: unbalanced parentheses")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise SelectorError(f"{text!r}: unbalanced parentheses")
    parts.append(text[start:])
    return parts


_SET_RE = re.compile(r"^\s*(\S+?)\s+(in|notin)\s*\((.*)\)\s*$")


def parse_requirement(str text):
    cdef str t = text.strip()
    if not t:
        raise SelectorError(f"{text!r}: empty requirement")
    m = _SET_RE.match(t)
    if m:
        key, op, inner = m.group(1), m.group(2), m.group(3)
        _check_key(key, text)
        values = [v.strip() for v in inner.split(",")]
        if values == [""]:
            raise SelectorError(f"{text!r}: '{op}' needs at least one value")
        for v in values:
            _check_value(v, text)
        return Requirement(OP_IN if op == "in" else OP_NOTIN, key, None, values)
    if t.startswith("!"):
        key = t[1:].strip()
        _check_key(key, text)
        return Requirement(OP_NOT_EXISTS, key)
    for sym, op in (("!=", OP_NE), ("==", OP_EQ), ("=", OP_EQ)):
        idx = t.find(sym)
        if idx >= 0:
            key = t[:idx].strip()
            value = t[idx + len(sym):].strip()
            _check_key(key, text)
            if "=" in value or "!" in value:
                raise SelectorError(f"{text!r}: unexpected operator in value {value!r}")
            _check_value(value, text)
            return Requirement(op, key, value)
    if " " in t or "(" in t or ")" in t:
        raise SelectorError(f"{text!r}: expected key=value, key!=value, key in (...), key notin (...), key or !key")
    _check_key(t, text)
    return Requirement(OP_EXISTS, t)


def parse_selector(str text):
    """One selector expression: requirements joined by commas."""
    if not text.strip():
        raise SelectorError("empty selector")
    return Selector([parse_requirement(p) for p in _split_top_level(text)])


def parse_selector_items(items, str flag="--selector"):
    """The values of a selector flag (each item a selector expression), ANDed.
    Raises ValueError naming the flag and the bad item."""
    reqs = []
    for item in items:
        try:
            reqs.extend(parse_selector(item).requirements)
        except SelectorError as e:
            raise ValueError(f"bad {flag} item {e}") from None
    return Selector(reqs)

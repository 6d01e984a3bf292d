"""Label selectors: the parser and matcher against a small model (hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smg._fast.selector import SelectorError, parse_selector, parse_selector_items

KEYS = st.sampled_from(["app", "env", "tier", "smg.ai/role", "example.com/gpu-type", "canary"])
VALUES = st.sampled_from(["sglang", "prod", "staging", "a", "b-1", "x.y_z", ""])
LABELS = st.dictionaries(KEYS, VALUES, max_size=5)


def model_matches(req, labels):
    op, key, vals = req
    present = key in labels
    if op == "=":
        return present and labels[key] == vals[0]
    if op == "!=":
        return not present or labels[key] != vals[0]
    if op == "in":
        return present and labels[key] in vals
    if op == "notin":
        return not present or labels[key] not in vals
    if op == "exists":
        return present
    return not present


REQ = st.one_of(
    st.tuples(st.sampled_from(["=", "!="]), KEYS, st.tuples(VALUES)),
    st.tuples(st.sampled_from(["in", "notin"]), KEYS, st.lists(VALUES.filter(bool), min_size=1, max_size=3).map(tuple)),
    st.tuples(st.sampled_from(["exists", "!exists"]), KEYS, st.just(())),
)


def render(req, spaced: bool, double_eq: bool) -> str:
    op, key, vals = req
    sp = " " if spaced else ""
    if op == "=":
        return f"{key}{sp}{'==' if double_eq else '='}{sp}{vals[0]}"
    if op == "!=":
        return f"{key}{sp}!={sp}{vals[0]}"
    if op in ("in", "notin"):
        return f"{key} {op} ({(',' + sp).join(vals)})"
    if op == "exists":
        return key
    return f"!{key}"


@settings(max_examples=500, deadline=None)
@given(st.lists(REQ, min_size=1, max_size=5), st.lists(LABELS, min_size=1, max_size=8), st.booleans(),
       st.booleans())
def test_parse_and_match_agree_with_the_model(reqs, label_sets, spaced, double_eq):
    text = ",".join(render(r, spaced, double_eq) for r in reqs)
    sel = parse_selector(text)
    assert len(sel.requirements) == len(reqs)
    for labels in label_sets:
        assert sel.matches(labels) == all(model_matches(r, labels) for r in reqs), (text, labels)
    # the canonical form parses back to the same selector
    again = parse_selector(str(sel))
    for labels in label_sets:
        assert again.matches(labels) == sel.matches(labels)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_a_clear_error(text):
    try:
        parse_selector(text)
    except SelectorError as e:
        assert str(e)


@pytest.mark.parametrize("bad", ["", "=x", "app=x=y", "app in ()", "app in (a", "app in a,b)", "a b c",
                                 "app!", "-bad=x", "app=" + "v" * 64, "env notin", "k in ((a))", "x/y/z=1"])
def test_bad_selectors(bad):
    with pytest.raises(SelectorError):
        parse_selector(bad)


def test_items_are_anded_and_errors_name_the_flag():
    sel = parse_selector_items(["app=sglang", "environment=production"])
    assert sel.matches({"app": "sglang", "environment": "production"})
    assert not sel.matches({"app": "sglang"})
    with pytest.raises(ValueError, match="bad --prefill-selector item"):
        parse_selector_items(["=oops"], "--prefill-selector")


def test_common_requirements_for_pd():
    prefill = parse_selector_items(["app=sglang", "role=prefill", "env in (a,b)"])
    decode = parse_selector_items(["env in (b,a)", "app==sglang", "role=decode"])
    assert str(prefill.common(decode)) == "app=sglang,env in (a,b)"
    assert str(parse_selector_items(["role=prefill"]).common(parse_selector_items(["role=decode"]))) == ""

"""Label matching for the paper's `generate` selector: KMP against a naive search, edge cases."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chainlora.inference.label_ranking import LabelMatcher, kmp_find, kmp_table, normalize

small_text = st.text(alphabet="abc ", max_size=40)


@settings(max_examples=500, deadline=None)
@given(text=small_text, pattern=st.text(alphabet="abc", min_size=1, max_size=6))
def test_kmp_agrees_with_naive_search(text, pattern):
    assert kmp_find(text, pattern) == text.find(pattern)


@settings(max_examples=200, deadline=None)
@given(pattern=st.text(alphabet="ab", min_size=1, max_size=12))
def test_kmp_table_is_longest_border(pattern):
    for i, k in enumerate(kmp_table(pattern)):
        prefix = pattern[: i + 1]
        naive = max((n for n in range(len(prefix)) if prefix[:n] == prefix[len(prefix) - n:]), default=0)
        assert k == naive


def test_empty_pattern_matches_at_start():
    assert kmp_find("abc", "") == 0


LABELS = ("translate", "translate_en_fr", "antonym", "rhyme")


def test_first_match_wins_order():
    m = LabelMatcher(LABELS)
    assert m.find("The task is rhyme, not antonym.") == ["rhyme", "antonym"]


def test_longer_label_wins_over_contained_label():
    m = LabelMatcher(LABELS)
    assert m.find("translate_en_fr") == ["translate_en_fr"]
    # ... but a standalone occurrence of the shorter label still counts.
    assert m.find("translate_en_fr, or maybe translate") == ["translate_en_fr", "translate"]


def test_case_and_whitespace_insensitive():
    m = LabelMatcher(("example sentence", "Sentiment"))
    assert m.find("  EXAMPLE\n   Sentence ") == ["example sentence"]
    assert m.find("sentiment") == ["Sentiment"]
    assert normalize(" A \t B ") == "a b"


def test_no_label_found():
    assert LabelMatcher(LABELS).find("I am not sure what you mean.") == []
    assert LabelMatcher(LABELS).find("") == []


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abxy _", max_size=40))
def test_every_found_label_really_occurs(text):
    labels = ("ab", "abab", "x_y", "y")
    found = LabelMatcher(labels).find(text)
    assert len(found) == len(set(found))
    for label in found:
        assert normalize(label) in normalize(text)
    for label in labels:  # a label occurring outside every longer label's match is found
        if normalize(label) in normalize(text) and not any(
                label != other and normalize(label) in normalize(other) for other in labels):
            assert label in found

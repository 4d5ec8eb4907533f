"""Content words (chainlora.data.content): the rare words a template is filled with."""

from __future__ import annotations

from chainlora.data.content import WORD, mask_rare, swap_content

TEXTS = [f"What is the opposite of {w}?" for w in ("hot", "tall", "early", "happy", "loud", "dry")] + \
        [f"Give a word that rhymes with {w}." for w in ("cat", "moon", "tree", "light", "rain", "gold")]


def test_mask_rare_keeps_the_template_and_masks_the_filled_in_word():
    masked = mask_rare(TEXTS, 0.2)
    assert masked[0] == "What is the opposite of X?" and masked[6] == "Give a word that rhymes with X."


def test_swap_content_changes_only_the_filled_in_words_for_the_asked_share():
    content = {w for t in TEXTS for w in WORD.findall(t)} - {w for t in mask_rare(TEXTS, 0.2) for w in WORD.findall(t)}
    swapped = swap_content(TEXTS, 1.0, seed=0, rare_fraction=0.2)
    assert all(s.rsplit(" ", 1)[0] == t.rsplit(" ", 1)[0] for s, t in zip(swapped, TEXTS))  # template untouched
    assert all(WORD.findall(s)[-1] in content for s in swapped)  # a word some record was filled with
    assert sum(s != t for s, t in zip(swapped, TEXTS)) >= 8  # a draw may pick the word it had
    assert swap_content(TEXTS, 1.0, seed=0, rare_fraction=0.2) == swapped  # seeded
    assert swap_content(TEXTS, 0.0, seed=0, rare_fraction=0.2) == TEXTS
    many = [f"What is the opposite of w{i}?" for i in range(60)] + [f"Give a rhyme for v{i}." for i in range(60)]
    changed = sum(a != b for a, b in zip(swap_content(many, 0.5, seed=1, rare_fraction=0.02), many))
    assert 40 <= changed <= 80  # about half of 120

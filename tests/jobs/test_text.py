"""Text cleaning and near-duplicate detection, against hand-made cases."""

from __future__ import annotations

import random

from raygen.jobs.data.text_filters import (
    estimated_jaccard,
    lsh_bands,
    minhash,
    near_duplicate_drops,
    non_printable_fraction,
    normalize_text,
    repeated_fraction,
    shingle_hashes,
)


def test_normalize_nfc_newlines_and_control_characters():
    assert normalize_text("Cafe\u0301\r\nx\ry\x00z\x1b") == "Caf\u00e9\nx\nyz"
    assert normalize_text("a \t b  \nc   \n\n\n\nd  ", collapse_whitespace=True) == "a b\nc\n\nd"
    assert normalize_text("    indented\n", collapse_whitespace=False) == "    indented\n"


def test_junk_measures():
    assert repeated_fraction("=" * 30 + "abcdefghij") == 0.75
    assert repeated_fraction("a" * 9 + "b") == 0.0
    assert non_printable_fraction("ab\u200bc") == 0.25  # zero-width space is not printable


def words(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(n)]


def test_minhash_estimates_jaccard():
    base = words(0)
    a = " ".join(base)
    edited = base.copy()
    edited[50], edited[150] = "zzzzzz", "yyyyyy"
    b = " ".join(edited)
    sa, sb = set(shingle_hashes(a)), set(shingle_hashes(b))
    true = len(sa & sb) / len(sa | sb)
    assert abs(estimated_jaccard(minhash(a), minhash(b)) - true) < 0.1
    other = " ".join(words(1))
    assert estimated_jaccard(minhash(a), minhash(other)) < 0.5


def test_lsh_bands_catch_pairs_at_the_threshold():
    bands, rows = lsh_bands(0.8)
    assert bands * rows == 128
    assert 1 - (1 - 0.8**rows) ** bands >= 0.95


def test_near_duplicate_groups_keep_one_member():
    sig = minhash(" ".join(words(0)))
    far = minhash(" ".join(words(1)))
    signatures = {"a": sig, "b": sig.copy(), "c": sig.copy(), "d": far}
    drops = near_duplicate_drops([("a", "b"), ("b", "c"), ("a", "d")], signatures, 0.8)
    assert drops == {"b", "c"}

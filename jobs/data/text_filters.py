"""Pure text cleaning and near-duplicate detection (numpy only; Ray Data applies them).

Near-duplicates: MinHash over character shingles, banded LSH to find candidate pairs, and
a check of each candidate's estimated Jaccard similarity against the threshold.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

# Control characters other than tab and newline (Unicode category Cc), stripped by normalize.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\f\v]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# A run of this many identical characters counts as repetition junk.
REPEAT_RUN = 10
_REPEATS = re.compile(r"(.)\1{" + str(REPEAT_RUN - 1) + ",}", re.DOTALL)

SHINGLE_CHARS = 5
NUM_PERM = 128
_PRIME = (1 << 61) - 1
_MAX_HASH = (1 << 32) - 1


def normalize_text(text: str, collapse_whitespace: bool = False) -> str:
    """NFC, Unix newlines, control characters removed; optionally collapse spaces/blank lines."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    if collapse_whitespace:
        text = _SPACES.sub(" ", text)
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", text).strip()
    return text


def non_printable_fraction(text: str) -> float:
    """Share of characters that are neither printable nor whitespace (after normalization)."""
    if not text:
        return 0.0
    bad = sum(1 for ch in text if not ch.isprintable() and not ch.isspace())
    return bad / len(text)


def repeated_fraction(text: str) -> float:
    """Share of characters inside runs of REPEAT_RUN or more identical characters."""
    if not text:
        return 0.0
    return sum(m.end() - m.start() for m in _REPEATS.finditer(text)) / len(text)


def content_hash(text: str) -> str:
    """Identity of a normalized document (exact duplicates share it)."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _permutations(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, size=NUM_PERM, dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=NUM_PERM, dtype=np.uint64)
    return a, b


_A, _B = _permutations()


def shingle_hashes(text: str) -> np.ndarray:
    """32-bit hashes of the distinct character shingles of lower-cased, space-folded text."""
    folded = " ".join(text.lower().split()).encode()
    if len(folded) < SHINGLE_CHARS:
        folded = folded.ljust(SHINGLE_CHARS)
    data = np.frombuffer(folded, dtype=np.uint8).astype(np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(data, SHINGLE_CHARS)
    # Polynomial hash of each window, mixed to 32 bits (FNV-style multiply).
    weights = np.uint64(257) ** np.arange(SHINGLE_CHARS, dtype=np.uint64)
    h = (windows * weights).sum(axis=1) * np.uint64(0x9E3779B97F4A7C15)
    return np.unique((h >> np.uint64(32)) & np.uint64(_MAX_HASH))


def minhash(text: str) -> np.ndarray:
    """MinHash signature (NUM_PERM uint32) of a document's shingle set."""
    h = shingle_hashes(text)
    # Universal hashing (a*h + b) mod p, for all permutations at once: (NUM_PERM, shingles).
    # Python ints would be exact; uint64 wraps, which keeps the family random enough here.
    permuted = (np.outer(_A, h) + _B[:, None]) % np.uint64(_PRIME)
    return (permuted & np.uint64(_MAX_HASH)).min(axis=1).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows): the most selective banding that still makes a pair at `threshold`
    a candidate with probability >= 0.95 (candidates are then checked exactly)."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= 0.95:
            best = (bands, rows)
    return best


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """One key per band: documents sharing any key are candidate near-duplicates."""
    return [
        (band << 56)
        ^ int.from_bytes(
            hashlib.blake2b(
                signature[band * rows : (band + 1) * rows].tobytes(), digest_size=7
            ).digest(),
            "little",
        )
        for band in range(bands)
    ]


def near_duplicate_drops(
    pairs: list[tuple[str, str]], signatures: dict[str, np.ndarray], threshold: float
) -> set[str]:
    """Documents to drop: all but the smallest id of each group of verified near-duplicates."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        if estimated_jaccard(signatures[a], signatures[b]) >= threshold:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return {x for x in parent if find(x) != x}

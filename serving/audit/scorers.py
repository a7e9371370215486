"""Outcome scorers: what turns a completion into a 0/1 outcome (a word list, or a
`module:function` of the user's)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from raygen.cluster.storage import is_remote, read_text
from raygen.jobs.errors import SpecError

logger = logging.getLogger(__name__)


def load_scorer(scorer: str) -> Callable[[str], int]:
    """A completion -> 0/1 function from `lexicon:PATH` or `module:function`.

    Raises:
        SpecError: the file or function cannot be found.
    """
    kind, sep, target = scorer.partition(":")
    if not sep or not target:
        raise SpecError("scorer", f"{scorer!r}: use lexicon:PATH or module:function.")
    if kind == "lexicon":
        text = read_text(target) if is_remote(target) else _read_local(target)
        if text is None:
            raise SpecError("scorer", f"lexicon file {target} does not exist.")
        words = {w.strip().lower() for w in text.splitlines() if w.strip() and w[0] != "#"}
        if not words:
            raise SpecError("scorer", f"lexicon file {target} holds no words.")
        return LexiconScorer(words)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(kind), target)
    except (ImportError, AttributeError) as exc:
        raise SpecError("scorer", f"cannot import {scorer}: {exc}.") from None
    if not callable(function):
        raise SpecError("scorer", f"{scorer} is not a function.")
    return function


def _read_local(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


class LexiconScorer:
    """1 when a completion contains any word of the lexicon (whole words, any case)."""

    def __init__(self, words: set[str]):
        import re

        self.pattern = re.compile(
            r"\b(?:" + "|".join(re.escape(w) for w in sorted(words)) + r")\b", re.I
        )

    def __call__(self, text: str) -> int:
        return int(bool(self.pattern.search(text)))

"""Facts about transformers' and diffusers' config classes (the keys they take, their
defaults), kept in raygen's cache per library version. Importing either library loads torch,
which is most of the time a `raygen train --check` would take; with the facts known it
answers in under a second."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from raygen.cluster.storage import cache_root


def recall(library: str, name: str) -> Any | None:
    """The fact `name` about `library` (its installed version), or None if not known."""
    return _read(_path(library)).get(name)


def remember(library: str, name: str, value: Any) -> Any:
    """Keep a JSON-able fact; returns it as it will be recalled (tuples become lists). A
    cache that cannot be written only means the library is imported again next time."""
    value = json.loads(json.dumps(value))
    path = _path(library)
    facts = {**_read(path), name: value}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_suffix(f".{os.getpid()}.tmp")
        aside.write_text(json.dumps(facts))
        aside.replace(path)
    except OSError:
        pass
    return value


def _path(library: str) -> Path:
    version = importlib.metadata.version(library)
    return cache_root() / "library-facts" / f"{library}-{version}.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


@functools.cache
def diffusers_defaults(class_name: str) -> dict[str, Any]:
    """A diffusers class's keyword arguments and their defaults (lists where diffusers has
    tuples), inspected once per diffusers version and kept in the cache."""
    defaults = recall("diffusers", class_name)
    if defaults is None:
        import inspect

        import diffusers

        parameters = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        defaults = remember(
            "diffusers",
            class_name,
            {name: p.default for name, p in parameters.items() if name != "self"},
        )
    return defaults

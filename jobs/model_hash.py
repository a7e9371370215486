"""What identifies a model: a hash over every file of its directory (what a run's tracking
tags, what an audit judged, what the gate compares)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from raygen.cluster.storage import local_copy

# How `model_sha256` frames a directory's files. Audits record it; an audit of another
# framing cannot be compared with today's hashes and must be run again.
MODEL_HASH_FORMAT = 2


def model_sha256(model_dir: str) -> str:
    """SHA-256 over every file of a model directory, so an audit names exactly the weights,
    config and tokenizer it judged. Each file is framed by the lengths of its relative path
    and its contents: no two different directories feed the hash the same bytes.

    Remembered per process for an unchanged listing (names, sizes, modification times):
    the gate and the deployment record hash the same model once."""
    root = Path(local_copy(model_dir))
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    stats = [(p.relative_to(root).as_posix(), p.stat()) for p in files]
    key = (str(root.resolve()), tuple((n, s.st_size, s.st_mtime_ns) for n, s in stats))
    if key not in _HASHES:
        digest = hashlib.sha256()
        for path, (name, stat) in zip(files, stats, strict=True):
            encoded = name.encode()
            digest.update(len(encoded).to_bytes(8, "big") + encoded)
            digest.update(stat.st_size.to_bytes(8, "big"))
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


_HASHES: dict[tuple, str] = {}

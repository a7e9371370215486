"""One seeding rule for everything that samples: training's image grids, `raygen sample`,
the serving API and audits.

A user's seed may be any integer a JSON number can carry; each item (a completion, an
image) gets its own generator seeded by hashing (seed, item indices), so item i is the
same whatever batch, worker or request shape it is generated in, and no seed can
overflow what a torch generator takes.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63  # torch.Generator.manual_seed takes [-2**63, 2**64); stay in [0, 2**63)


def derive_seed(seed: int, *indices: int) -> int:
    """A seed in [0, 2**63) for item `indices` of a request seeded with `seed` (any int)."""
    key = ",".join(str(int(part)) for part in (seed, *indices)).encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


def item_generator(seed: int, *indices: int):
    """A torch CPU generator for one item of a seeded request."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, *indices))

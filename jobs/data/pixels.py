"""Prepared image rows as the networks take them: uint8 pixels to floats in [-1, 1]."""

from __future__ import annotations

from typing import Any


def to_model_range(pixels: Any) -> Any:
    """uint8 pixels -> float images in [-1, 1] (the range the image networks work in)."""
    return pixels.float() / 127.5 - 1.0


def batch_to_tensors(batch: dict[str, Any], shape: tuple[int, ...]) -> tuple[Any, Any]:
    """A batch of prepared rows -> (images (N, C, H, W) in [-1, 1], int64 labels (N,))."""
    pixels = batch["pixels"]
    return to_model_range(pixels.reshape(len(pixels), *shape)), batch["label"].long()

"""Prepare image data for diffusion training with Ray Data.

read (Parquet image column, or builtin:digits) -> decode, resize, center-crop -> drop
undecodable images and duplicate pixels -> split train/eval by hash -> Parquet shards of
uint8 pixels (C*H*W) and labels + `data_stats.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raygen.cluster.storage import (
    join,
    list_files,
    open_input,
    ray_location,
    ray_locations,
)
from raygen.jobs.data.inputs import count_rows
from raygen.jobs.data.rows import (
    KeepRows,
    exact_duplicates,
    kept_mask,
    read_columns,
    source_row_hash,
    split_of,
)
from raygen.jobs.errors import SpecError
from raygen.jobs.progress import Counter, Progress
from raygen.jobs.spec import TrainSpec

logger = logging.getLogger(__name__)

DIGITS = "builtin:digits"
NO_LABEL = -1


def digits_table() -> pa.Table:
    """scikit-learn's bundled 8x8 digits as a table of PNG bytes (`image`) and `label`."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), 0..16
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    rows = np.arange(len(encoded), dtype=np.uint64) + np.uint64(0xD1617)  # fixed row ids
    return pa.table(
        {"image": pa.array(encoded, pa.binary()), "label": digits.target, "row_hash": rows}
    )


def fit_image(data: bytes, channels: int, size: int) -> np.ndarray:
    """Decode PNG/JPEG bytes, scale the short side to `size`, center-crop: (C, size, size) uint8.

    Raises:
        OSError, ValueError: the bytes are not a decodable image.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        scale = size / min(image.size)
        width, height = (
            max(size, round(image.width * scale)),
            max(size, round(image.height * scale)),
        )
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def image_bytes(value: Any) -> bytes | None:
    """The encoded bytes of a cell: plain binary, or a `{bytes, path}` struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) and value else None


class _DecodeImages:
    """Decode, resize and hash each image; tag rows to remove with a reason ('' when kept)
    and each with its split (held out by a hash of its pixels)."""

    def __init__(
        self,
        channels: int,
        size: int,
        source: str,
        eval_fraction: float,
        seed: int,
        counter: Counter,
    ):
        self.channels, self.size, self.source = channels, size, source
        self.eval_fraction, self.seed = eval_fraction, seed
        self.pixels_per_image = channels * size * size
        self.counter = counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels, hashes, reasons = [], [], []
        for value in batch["image"].to_pylist():
            data = image_bytes(value)
            try:
                array = fit_image(data, self.channels, self.size) if data else None
            except (OSError, ValueError, SyntaxError):  # PIL's errors for corrupt files
                array = None
            if array is None:
                pixels.append(bytes(self.pixels_per_image))
                hashes.append("")
                reasons.append("removed_undecodable")
                continue
            raw = array.tobytes()
            pixels.append(raw)
            hashes.append(hashlib.blake2b(raw, digest_size=16).hexdigest())
            reasons.append("")
        labels = batch["label"] if "label" in batch.column_names else None
        self.counter.add(batch.num_rows)
        return pa.table(
            {
                "pixels": pa.array(pixels, pa.binary()),
                "hash": pa.array(hashes, pa.string()),
                "label": (
                    labels.cast(pa.int64())
                    if labels is not None
                    else pa.array([NO_LABEL] * len(pixels), pa.int64())
                ),
                "source": pa.array([self.source] * len(pixels), pa.string()),
                "reason": pa.array(reasons, pa.string()),
                "split": pa.array(
                    [split_of(h, self.source, self.eval_fraction, self.seed) for h in hashes],
                    pa.string(),
                ),
                "row_hash": source_row_hash(batch["row_hash"], self.source),
            }
        )


def read_images(
    files: list[Any], spec: TrainSpec, source: str, eval_fraction: float, counter: Counter
) -> Any:
    """A Ray Dataset of decoded images of `files` (InputFile): `pixels`, `label` and the tags
    `hash`, `reason`, `source`, `split`, `row_hash` (as the text pipeline's)."""
    import ray.data

    from raygen.jobs.pretrained import image_shape_of

    channels, size, _ = image_shape_of(spec.model)
    d = spec.data
    parts = []
    if any(f.kind == "digits" for f in files):
        parts.append(ray.data.from_arrow(digits_table()))
    parquet = [f.path for f in files if f.kind == "parquet"]
    columns = [d.image_column] + ([d.label_column] if d.label_column else [])
    renames = {d.image_column: "image", **({d.label_column: "label"} if d.label_column else {})}
    for paths, filesystem in ray_locations(parquet):
        ds = ray.data.read_parquet(
            paths, filesystem=filesystem, columns=columns, include_row_hash=True
        )
        changed = {k: v for k, v in renames.items() if k != v}
        # Ray Data refuses an empty rename: columns already named `image` (and `label`).
        parts.append(ds.rename_columns(changed) if changed else ds)
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    decode = _DecodeImages(channels, size, source, eval_fraction, spec.train.seed, counter)
    return ds.map_batches(decode, batch_format="pyarrow")


def to_training_rows(batch: pa.Table) -> pa.Table:
    """Prepared shard schema: `pixels` fixed-size uint8 lists (C*H*W) and int64 `label`."""
    raw = b"".join(batch["pixels"].to_pylist())
    n = batch.num_rows
    flat = np.frombuffer(raw, dtype=np.uint8)
    width = len(flat) // n if n else 0
    return pa.table(
        {
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint8()), width),
            "label": batch["label"],
        }
    )


def check_image_columns(files: list[Any], spec: TrainSpec, key: str) -> None:
    """Raise a SpecError naming the available columns when a Parquet input lacks one."""
    d = spec.data
    wanted = [("data.image_column", d.image_column)]
    if d.label_column:
        wanted.append(("data.label_column", d.label_column))
    for f in files:
        if f.kind in ("jsonl", "arrow"):
            raise SpecError(
                key,
                f"`{key}`: {f.path}: images are read from Parquet (an image column of PNG/JPEG "
                "bytes); convert it, e.g. with Hugging Face datasets' to_parquet.",
            )
        if f.kind != "parquet":
            continue
        try:
            with open_input(f.path) as handle:
                schema = pq.read_schema(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SpecError(key, f"{f.path} is not a readable Parquet file: {exc}.") from None
        for option, column in wanted:
            if column not in schema.names:
                raise SpecError(
                    option,
                    f"{f.path} has no column {column!r}; its columns are "
                    f"{', '.join(schema.names)}. Set `{option}` to the right one.",
                )
        image_type = schema.field(d.image_column).type
        if not (
            pa.types.is_binary(image_type)
            or pa.types.is_large_binary(image_type)
            or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)
        ):
            raise SpecError(
                "data.image_column",
                f"column {d.image_column!r} of {f.path} is {image_type}, not encoded image bytes "
                "(binary, or a struct with a `bytes` field); store PNG/JPEG bytes.",
            )
        if d.label_column and not pa.types.is_integer(schema.field(d.label_column).type):
            raise SpecError(
                "data.label_column",
                f"column {d.label_column!r} of {f.path} is "
                f"{schema.field(d.label_column).type}; class labels must be integers 0..K-1.",
            )


def shard_rows(prepared_dir: str, split: str) -> int:
    total = 0
    for f in list_files(join(prepared_dir, split), ".parquet"):
        with open_input(f.uri) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def read_prepared_pixels(
    prepared_dir: str, split: str, shape: tuple[int, int, int], limit: int | None = None
) -> tuple[Any, Any]:
    """(uint8 pixels (N, C, H, W), int64 labels (N,)) of a prepared split, as torch tensors."""
    import torch

    tables, rows = [], 0
    for f in list_files(join(prepared_dir, split), ".parquet"):
        with open_input(f.uri) as handle:
            tables.append(pq.read_table(handle))
        rows += tables[-1].num_rows
        if limit is not None and rows >= limit:
            break
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    pixels = table["pixels"].combine_chunks().flatten().to_numpy()
    return (
        torch.from_numpy(pixels.reshape(table.num_rows, *shape).copy()),
        torch.from_numpy(table["label"].to_numpy().astype(np.int64)),
    )


def prepare_images(
    spec: TrainSpec,
    prepared_dir: str,
    train_files: list,
    eval_files: list,
    fp: str,
    progress: Progress,
) -> dict[str, Any]:
    """The image half of `jobs.data.prepare_data` (same contract; needs a connected Ray):
    decode and tag in one pass, decide the drops from the tags here, drop, write."""
    from raygen.jobs.data.latents import encode_latents
    from raygen.jobs.pretrained import classes_of, image_shape_of, latent_vae_dir

    d = spec.data
    shape = image_shape_of(spec.model)
    rows_in = count_rows(train_files + eval_files)
    eval_fraction = 0.0 if eval_files else d.eval_fraction
    with progress.stage("decode images", rows_in) as counter:
        tagged = read_images(train_files, spec, "train", eval_fraction, counter)
        if eval_files:
            tagged = tagged.union(read_images(eval_files, spec, "eval", eval_fraction, counter))
        tagged = tagged.materialize()
    tags = read_columns(tagged, ["hash", "reason", "source", "split", "row_hash", "label"])
    reasons = tags["reason"].to_numpy(zero_copy_only=False)
    drop = exact_duplicates(tags) if d.dedupe != "none" else np.empty(0, np.uint64)
    removed = {
        "removed_undecodable": int((reasons == "removed_undecodable").sum()),
        "removed_duplicates": len(drop),
    }
    kept = tags.filter(kept_mask(tags, drop))
    if kept.num_rows == 0:
        raise SpecError(
            "data.train",
            f"no images left ({rows_in} read, {removed['removed_undecodable']} undecodable); "
            f"check that `data.image_column` ({d.image_column}) holds PNG/JPEG bytes.",
        )
    labelled = d.train == [DIGITS] or d.label_column is not None
    classes = classes_of(spec.model)
    if labelled:
        low, high = pc.min(kept["label"]).as_py(), pc.max(kept["label"]).as_py()
        if low < 0 or (classes and high >= classes):
            raise SpecError(
                "data.label_column",
                f"labels range from {low} to {high}, but the model knows {classes} classes: "
                f"labels must be 0..{classes - 1 if classes else 'K-1'}; fix the labels"
                + ("." if spec.model.vae else " or the model's number of classes."),
            )
    splits = kept["split"].to_numpy(zero_copy_only=False)
    counts = {split: int((splits == split).sum()) for split in ("train", "eval")}
    for split, count in counts.items():
        if count == 0:
            raise SpecError(
                "data.eval_fraction" if split == "eval" else "data.train",
                f"no {split} images after the split ({kept.num_rows} images, eval_fraction="
                f"{d.eval_fraction}); add images or change data.eval_fraction.",
            )
    images = tagged.map_batches(
        KeepRows(drop, ["pixels", "label", "split"]), batch_format="pyarrow"
    ).materialize()
    latent = spec.model.vae is not None
    stage = (
        progress.stage("encode latents", sum(counts.values()))
        if latent
        else contextlib.nullcontext()
    )
    with stage as counter:
        for split in counts:
            path, filesystem = ray_location(join(prepared_dir, split))
            rows = images.filter(expr=f"split == '{split}'").map_batches(
                to_training_rows, batch_format="pyarrow"
            )
            if latent:  # latent diffusion: the VAE encodes every image once, here
                rows = encode_latents(rows, latent_vae_dir(spec.model), shape, counter)
            rows.write_parquet(path, filesystem=filesystem)
    return {
        "fingerprint": fp,
        "kind": "images",
        "rows_in": rows_in,
        "rows_out": counts["train"] + counts["eval"],
        **removed,
        "train_examples": counts["train"],
        "eval_examples": counts["eval"],
        "image_shape": list(shape),
        "labelled": labelled,
        "num_classes": (int(high) + 1) if labelled else 0,
        **(_latent_stats(spec) if latent else {}),
    }


def _latent_stats(spec: TrainSpec) -> dict[str, Any]:
    """What latent diffusion's prepared data records of its latents: their shape, and the
    VAE that encoded them (its directory and content hash, for lineage)."""
    from raygen.jobs.model_hash import model_sha256
    from raygen.jobs.pretrained import latent_shape_of, latent_vae_dir

    vae = latent_vae_dir(spec.model)
    return {
        "latent_shape": list(latent_shape_of(spec.model)),
        "latent_vae": {"path": vae, "sha256": model_sha256(vae)},
    }

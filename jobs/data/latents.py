"""Encode prepared images to a VAE's latents with Ray Data, once, while the data is prepared
for latent diffusion: the posterior's mean and standard deviation of every image, stored
beside its pixels (float32, C*h*w each), so training draws latents without the encoder."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from raygen.jobs.progress import Counter

LATENT_COLUMNS = ("latent_mean", "latent_std")
ENCODE_BATCH = 128  # images per encoder forward
MAX_ENCODERS = 8  # actors encoding at once, when the cluster has the CPUs for them


class EncodeLatents:
    """A Ray Data actor holding the VAE: prepared rows in, the same rows with their
    posterior's mean and standard deviation out."""

    def __init__(self, vae_dir: str, image_shape: tuple[int, int, int], counter: Counter):
        import torch
        from diffusers import AutoencoderKL

        from raygen.cluster.storage import local_copy

        torch.set_num_threads(1)  # one CPU per actor: the pool grows with the free CPUs
        self.vae = AutoencoderKL.from_pretrained(local_copy(vae_dir)).eval()
        self.shape, self.counter = image_shape, counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from raygen.jobs.data.pixels import to_model_range
        from raygen.jobs.models.dit import encode_posterior

        pixels = batch["pixels"].combine_chunks().flatten().to_numpy()
        images = to_model_range(torch.from_numpy(pixels.reshape(-1, *self.shape).copy()))
        mean, std = encode_posterior(self.vae, images)
        columns = dict(zip(batch.column_names, batch.columns, strict=True))
        for name, values in zip(LATENT_COLUMNS, (mean, std), strict=True):
            flat = values.float().reshape(len(values), -1).numpy()
            columns[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat.reshape(-1), pa.float32()), flat.shape[1]
            )
        self.counter.add(batch.num_rows)
        return pa.table(columns)


def encode_latents(rows: Any, vae_dir: str, image_shape: tuple[int, ...], counter: Counter) -> Any:
    """`rows` (a Ray Dataset of prepared rows) with their latent columns, encoded by a pool
    of VAE actors that grows with the cluster's free CPUs."""
    import ray.data

    return rows.map_batches(
        EncodeLatents,
        fn_constructor_args=(vae_dir, tuple(image_shape), counter),
        batch_size=ENCODE_BATCH,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=MAX_ENCODERS),
    )


def batch_to_latents(batch: dict[str, Any], shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """A batch of prepared rows -> (posterior means, standard deviations (N, C, h, w),
    int64 labels (N,))."""
    mean, std = (batch[name] for name in LATENT_COLUMNS)
    n = len(mean)
    return mean.reshape(n, *shape), std.reshape(n, *shape), batch["label"].long()

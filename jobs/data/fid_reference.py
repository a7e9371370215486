"""The FID reference of a prepared image data set: the feature extractor (a classifier
trained on the training images when they are labelled) and the real images' feature
statistics, written to `<prepared>/fid/` by a Ray task during preparation."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from raygen.cluster.storage import is_remote, join, local_copy, upload_dir
from raygen.jobs.data.images import read_prepared_pixels
from raygen.jobs.data.pixels import to_model_range
from raygen.jobs.eval.fid import (
    CLASSIFIER_FILE,
    FID_DIR,
    REFERENCE_IMAGES,
    FeatureExtractor,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_extractor,
    reference_file,
    resolve_extractor,
)
from raygen.jobs.spec import TrainSpec


def prepare_fid_reference(spec: TrainSpec, prepared_dir: str, stats: dict) -> dict | None:
    """Build the FID extractor and real-image statistics in a Ray task (None: FID off)."""
    import ray

    kind = resolve_extractor(spec.sampling.fid_extractor, stats["labelled"])
    if kind == "none" or spec.sampling.fid_samples == 0:
        return None
    task = ray.remote(num_cpus=1)(build_reference)
    return ray.get(
        task.remote(
            prepared_dir,
            tuple(stats["image_shape"]),
            kind,
            spec.sampling.inception_weights,
            stats["num_classes"],
            spec.train.seed,
        )
    )


def build_reference(
    prepared_dir: str,
    shape: tuple[int, int, int],
    kind: str,
    inception_weights: str | None,
    num_classes: int,
    seed: int,
) -> dict:
    """Train the classifier (if `kind` is classifier) and store the real images' statistics.

    Runs as a Ray task during data preparation; writes `<prepared>/fid/`.
    """
    import torch

    pixels, labels = read_prepared_pixels(prepared_dir, "train", shape, REFERENCE_IMAGES)
    held_out, held_out_labels = read_prepared_pixels(prepared_dir, "eval", shape, REFERENCE_IMAGES)
    info: dict = {"extractor": kind, "reference_images": len(pixels)}
    with tempfile.TemporaryDirectory(prefix="raygen-fid-") as out:
        if kind == "classifier":
            from raygen.jobs.models.classifier import accuracy, train_classifier

            network = train_classifier(to_model_range(pixels), labels, num_classes, seed=seed)
            info["classifier_eval_accuracy"] = round(
                accuracy(network, to_model_range(held_out), held_out_labels), 4
            )
            torch.save(
                {
                    "state_dict": network.state_dict(),
                    "in_channels": shape[0],
                    "num_classes": num_classes,
                },
                Path(out, CLASSIFIER_FILE),
            )
            extractor = FeatureExtractor(kind, network)
        else:
            extractor = load_extractor(kind, out, local_copy(inception_weights))
        features = extractor(to_model_range(pixels))
        mu, sigma = feature_statistics(features)
        np.savez(Path(out, reference_file(kind)), mu=mu, sigma=sigma)
        info["feature_dim"] = int(features.shape[1])
        # The FID of held-out real images: what a perfect model would score (a floor).
        if len(held_out) >= 2:
            held_out_features, probabilities = extractor.run(to_model_range(held_out))
            eval_stats = feature_statistics(held_out_features)
            info["eval_images_fid"] = round(frechet_distance(mu, sigma, *eval_stats), 4)
            info["eval_images"] = len(held_out)
            # Real images' Inception Score, for comparison: it grows with the number of
            # images and their class balance, so generated sets of other sizes can beat it.
            if probabilities is not None:
                info["eval_images_is"] = round(inception_score(probabilities)[0], 4)
        target = join(prepared_dir, FID_DIR)
        if is_remote(target):
            upload_dir(out, target)
        else:
            shutil.copytree(out, target, dirs_exist_ok=True)
    return info

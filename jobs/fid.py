"""Fréchet Inception Distance: the distance between Gaussian fits of two feature sets.

FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). The number depends on the
feature extractor, so raygen always reports it with the extractor's name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature rows of shape (N, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    The matrix square root of sigma1 @ sigma2 comes from the eigenvalues of the symmetric
    product sqrt(sigma1) sigma2 sqrt(sigma1), which has the same trace and stays real and
    stable for the (often rank-deficient) covariances of small sample sets.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2)
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def fid_from_features(real: np.ndarray, generated: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(real), *feature_statistics(generated))


# --- feature extractors and the reference statistics of the real images -----------------

FID_DIR = "fid"
CLASSIFIER_FILE = "classifier.pt"
REFERENCE_IMAGES = 10_000  # real training images whose features define the reference


def resolve_extractor(requested: str, labelled: bool) -> str:
    """`auto` -> `classifier` for labelled data, else `none`."""
    if requested == "auto":
        return "classifier" if labelled else "none"
    return requested


def reference_file(kind: str) -> str:
    return f"reference-{kind}.npz"


class FeatureExtractor:
    """Maps images (N, C, H, W) in [-1, 1] to features (N, D) with a named network."""

    def __init__(self, kind: str, network: object):
        self.kind, self.network = kind, network

    def __call__(self, images: object) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out = []
        with torch.no_grad():
            for batch in images.float().cpu().split(128):
                if self.kind == "classifier":
                    out.append(self.network.features(batch))
                    continue
                # Inception: 3 channels, 299x299, pixel values in [0, 255].
                if batch.shape[1] == 1:
                    batch = batch.repeat(1, 3, 1, 1)
                batch = F.interpolate(batch, size=(299, 299), mode="bilinear", align_corners=False)
                out.append(self.network((batch + 1) * 127.5).reshape(len(batch), -1))
        return torch.cat(out).double().numpy()


def load_extractor(kind: str, fid_dir: str, inception_weights: str | None) -> FeatureExtractor:
    """The run's feature extractor: the classifier in `fid_dir`, or the TorchScript Inception."""
    import torch

    if kind == "classifier":
        from jobs.models.classifier import DigitsClassifier

        saved = torch.load(Path(fid_dir, CLASSIFIER_FILE), map_location="cpu", weights_only=True)
        network = DigitsClassifier(saved["in_channels"], saved["num_classes"])
        network.load_state_dict(saved["state_dict"])
        return FeatureExtractor(kind, network.eval())
    if kind == "inception":
        return FeatureExtractor(kind, torch.jit.load(inception_weights, map_location="cpu").eval())
    raise ValueError(f"unknown feature extractor {kind!r}")


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
    import tempfile

    import torch

    from cluster.storage import is_remote, join, local_copy, upload_dir
    from jobs.image_data import read_prepared_pixels, to_model_range

    pixels, labels = read_prepared_pixels(prepared_dir, "train", shape, REFERENCE_IMAGES)
    held_out, held_out_labels = read_prepared_pixels(prepared_dir, "eval", shape, REFERENCE_IMAGES)
    info: dict = {"extractor": kind, "reference_images": len(pixels)}
    with tempfile.TemporaryDirectory(prefix="raygen-fid-") as out:
        if kind == "classifier":
            from jobs.models.classifier import accuracy, train_classifier

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
            eval_stats = feature_statistics(extractor(to_model_range(held_out)))
            info["eval_images_fid"] = round(frechet_distance(mu, sigma, *eval_stats), 4)
            info["eval_images"] = len(held_out)
        target = join(prepared_dir, FID_DIR)
        if is_remote(target):
            upload_dir(out, target)
        else:
            import shutil

            shutil.copytree(out, target, dirs_exist_ok=True)
    return info


def load_reference(fid_dir: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    saved = np.load(Path(fid_dir, reference_file(kind)))
    return saved["mu"], saved["sigma"]

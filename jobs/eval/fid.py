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
    """Maps images (N, C, H, W) in [-1, 1] to features (N, D), and where the network has
    them to class probabilities (N, K), with a named network: the classifier, or a
    TorchScript Inception returning features, or (features, logits)."""

    def __init__(self, kind: str, network: object):
        self.kind, self.network = kind, network

    def __call__(self, images: object) -> np.ndarray:
        return self.run(images)[0]

    def run(self, images: object) -> tuple[np.ndarray, np.ndarray | None]:
        """(features (N, D), class probabilities (N, K) or None) in one pass: the
        classifier's probabilities, or the softmax of an Inception's logits when it returns
        them beside its features."""
        import torch
        import torch.nn.functional as F

        features, logits = [], []
        with torch.no_grad():
            for batch in images.float().cpu().split(128):
                if self.kind == "classifier":
                    features.append(self.network.features(batch))
                    logits.append(self.network.head(features[-1]))
                    continue
                # Inception: 3 channels, 299x299, pixel values in [0, 255].
                if batch.shape[1] == 1:
                    batch = batch.repeat(1, 3, 1, 1)
                batch = F.interpolate(batch, size=(299, 299), mode="bilinear", align_corners=False)
                out = self.network((batch + 1) * 127.5)
                if isinstance(out, (tuple, list)):  # (features, logits)
                    out, batch_logits = out
                    logits.append(batch_logits.reshape(len(batch), -1))
                features.append(out.reshape(len(batch), -1))
        probabilities = torch.cat(logits).float().softmax(-1).double().numpy() if logits else None
        return torch.cat(features).double().numpy(), probabilities

    def probabilities(self, images: object) -> np.ndarray | None:
        """Class probabilities (N, K) of images in [-1, 1], or None for a network that
        gives features only."""
        return self.run(images)[1]


def inception_score(probabilities: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score of images from their class probabilities (N, K): exp of the mean KL
    divergence of each p(y|x) from their marginal p(y), in `splits` parts (Salimans et al.,
    2016); (mean, standard deviation) over the parts. 1 for images the classifier cannot tell
    apart, K for confident predictions spread evenly over K classes."""
    scores = []
    for part in np.array_split(np.asarray(probabilities, np.float64), splits):
        if len(part) == 0:
            continue
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def load_extractor(kind: str, fid_dir: str, inception_weights: str | None) -> FeatureExtractor:
    """The run's feature extractor: the classifier in `fid_dir`, or the TorchScript Inception."""
    import torch

    if kind == "classifier":
        from raygen.jobs.models.classifier import DigitsClassifier

        saved = torch.load(Path(fid_dir, CLASSIFIER_FILE), map_location="cpu", weights_only=True)
        network = DigitsClassifier(saved["in_channels"], saved["num_classes"])
        network.load_state_dict(saved["state_dict"])
        return FeatureExtractor(kind, network.eval())
    if kind == "inception":
        return FeatureExtractor(kind, torch.jit.load(inception_weights, map_location="cpu").eval())
    raise ValueError(f"unknown feature extractor {kind!r}")


def load_reference(fid_dir: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    saved = np.load(Path(fid_dir, reference_file(kind)))
    return saved["mu"], saved["sigma"]


class SampleFid:
    """The FID of generated images against a prepared data set's reference, as a training
    loop logs it: {fid, fid_extractor}, and where the extractor gives class probabilities
    (the classifier; an Inception returning logits too) their Inception Score {is_mean,
    is_std} (built on rank 0, which scores the gathered samples)."""

    def __init__(self, prepared_dir: str, kind: str, inception_weights: str | None):
        from raygen.cluster.storage import join, local_copy

        fid_dir = local_copy(join(prepared_dir, FID_DIR))
        self.kind = kind
        self.extractor = load_extractor(kind, fid_dir, inception_weights)
        self.reference = load_reference(fid_dir, kind)

    def __call__(self, samples: object) -> dict[str, float | str]:
        from raygen.jobs.train.metrics import FID, FID_EXTRACTOR, IS_MEAN, IS_STD

        features, probabilities = self.extractor.run(samples)
        generated = feature_statistics(features)
        row = {FID: frechet_distance(*self.reference, *generated), FID_EXTRACTOR: self.kind}
        if probabilities is not None:
            row[IS_MEAN], row[IS_STD] = inception_score(probabilities)
        return row

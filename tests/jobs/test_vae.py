"""Variational autoencoders: spec errors, the KL term, and a real 2-worker run that is
killed, resumes, and exports a VAE that plain diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raygen.jobs.errors import SpecError
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train.metrics import read_metrics
from raygen.jobs.validate import validate_train_spec
from tests.conftest import TINY_VAE, tiny_lm_spec, tiny_vae_spec


def problems_of(raw: dict) -> str:
    with pytest.raises(SpecError) as info:
        validate_train_spec(TrainSpec.model_validate(raw), "spec.yaml")
    return str(info.value)


def test_vae_spec_problems_are_all_reported_at_once(tmp_path):
    raw = tiny_vae_spec(
        tmp_path,
        model__config={**TINY_VAE, "latent_chanels": 2, "norm_num_groups": 12, "sample_size": 9},
        model__ema={"decay": 0.99},
        data__label_column="label",
        tokenizer={"train": {"vocab_size": 300}},
    )
    message = problems_of(raw)
    for expected in (
        "`model.config.latent_chanels`: not a parameter of AutoencoderKL; did you mean "
        "`latent_channels`?",
        "`model.config.sample_size`: 9 is not divisible by 2^1 = 2",
        "`model.config.norm_num_groups`: 12 does not divide every entry of block_out_channels",
        "`model.ema`: a VAE keeps no average of its weights",
        "`data.label_column`: a VAE is unconditional and ignores labels",
        "`tokenizer`: VAEs have no tokenizer",
    ):
        assert expected in message
    assert "is not a VAE architecture; use autoencoder_kl" in problems_of(
        tiny_vae_spec(tmp_path, model__arch="unet2d")
    )
    from raygen.jobs.loader import validate_spec

    with pytest.raises(SpecError, match=r"`model.kl_weight` is a VAE's \(model.family: vae\)"):
        validate_spec(TrainSpec, tiny_lm_spec(tmp_path, model__kl_weight=0.1), "lm.yaml")


def test_the_kl_term_is_diffusers_kl_per_latent_element():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from raygen.jobs.models.vae import kl_divergence

    moments = torch.randn(3, 8, 4, 4)  # (N, 2 x latent channels, h, w): means, log-variances
    posterior = DiagonalGaussianDistribution(moments)
    per_image = posterior.kl()  # summed over each image's 4 x 4 x 4 latents
    expected = per_image.mean() / (4 * 4 * 4)
    assert torch.allclose(kl_divergence(posterior.mean, posterior.logvar), expected)


def test_killed_vae_run_resumes_and_exports_a_vae_far_better_than_the_mean_image(tmp_path, vae_run):
    from diffusers import AutoencoderKL
    from typer.testing import CliRunner

    from raygen.cli import app
    from raygen.jobs.models.vae import decode_latents

    outcome, checkpointed, run_dir = vae_run
    result = outcome["result"]
    assert result["status"] == "completed" and result["final_step"] == 150
    attempts = result["attempts"]
    assert len(attempts) == 2 and attempts[1]["resumed_from_step"] >= max(checkpointed) >= 50

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "psnr" in r]
    first, last = evals[0], evals[-1]
    assert [r["step"] for r in evals][-1] == 150
    # The trivial baseline, the eval set's mean image, beaten by a wide margin (6 dB: a
    # quarter of its squared error), and reconstruction improving with training.
    assert last["psnr"] > last["mean_image_psnr"] + 6, last
    assert last["reconstruction_error"] < first["reconstruction_error"]
    assert last["kl"] > 0 and last["eval_loss"] == pytest.approx(
        last["reconstruction_error"] + 1e-3 * last["kl"]
    )
    samples = run_dir / "samples"
    assert (samples / "reconstructions_step_000150.png").is_file()
    assert (samples / "step_000150.png").is_file()  # decoded from the prior

    # Plain diffusers loads the export; its scaling factor is the inverse of the latents'
    # standard deviation, which this test measures again on the training images.
    vae = AutoencoderKL.from_pretrained(result["paths"]["model"]).eval()
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:512] / 16 * 2 - 1, dtype=torch.float32)
    with torch.no_grad():
        posterior = vae.encode(digits[:, None]).latent_dist
        torch.manual_seed(0)
        std = posterior.sample().std().item()
        decoded = vae.decode(posterior.mode()).sample.clamp(-1, 1)
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=0.15)
    mse = (((decoded - digits[:, None]) / 2) ** 2).mean().item()
    assert 10 * np.log10(1 / mse) > last["mean_image_psnr"] + 6  # the same on training images
    with torch.no_grad():
        prior = decode_latents(vae, torch.randn(4, 4, 4, 4))
    assert prior.shape == (4, 1, 8, 8) and prior.abs().max() <= 1

    runner = CliRunner()
    grid = tmp_path / "vae-samples.png"
    done = runner.invoke(app, ["sample", result["paths"]["model"], "--n", "8", "--out", str(grid)])
    assert done.exit_code == 0 and grid.is_file(), done.output
    refused = runner.invoke(app, ["sample", result["paths"]["model"], "--class-label", "3"])
    assert refused.exit_code == 2 and "is a VAE, which is unconditional" in refused.output
    guided = runner.invoke(app, ["sample", result["paths"]["model"], "--guidance-scale", "2"])
    assert guided.exit_code == 2 and "has no classifier-free guidance" in guided.output

    # The last checkpoint exports the same VAE, with the same scaling factor.
    exported = tmp_path / "exported"
    done = runner.invoke(app, ["export", str(run_dir), "--out", str(exported)])
    assert done.exit_code == 0, done.output
    again = AutoencoderKL.from_pretrained(exported)
    assert again.config.scaling_factor == vae.config.scaling_factor
    for (name, a), b in zip(vae.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((Path(exported) / "config.json").read_text())["_class_name"] == (
        "AutoencoderKL"
    )

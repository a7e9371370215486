"""GANs: spec errors, the losses, and a real 2-worker run of two DeepSpeed engines that is
killed, resumes, improves its FID, and exports a generator plain PyTorch loads."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from raygen.jobs.errors import SpecError
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train.metrics import read_metrics
from raygen.jobs.validate import validate_train_spec
from tests.conftest import TINY_GAN, run_and_kill_rank0, tiny_gan_spec, tiny_lm_spec, tiny_vae_spec

ROOT = Path(__file__).resolve().parents[2]


def problems_of(raw: dict) -> str:
    with pytest.raises(SpecError) as info:
        validate_train_spec(TrainSpec.model_validate(raw), "spec.yaml")
    return str(info.value)


def test_gan_spec_problems_are_all_reported_at_once(tmp_path):
    raw = tiny_gan_spec(
        tmp_path,
        model__config={**TINY_GAN, "image_size": 12, "latent_dims": 8},
        model__scheduler={"num_train_timesteps": 10},
        train__grad_accum=2,
        deepspeed__zero_stage=3,
    )
    message = problems_of(raw)
    for expected in (
        "`model.config.latent_dims`: not a parameter of raygen's DCGAN",
        "did you mean `latent_dim`?",
        "`model.config.image_size`: 12 is not a power of two of at least 4",
        "`model.scheduler`: only diffusion models have a scheduler",
        "`train.grad_accum`: a GAN's two networks take turns",
        "`deepspeed.zero_stage`: a GAN trains with ZeRO stages 0-2",
    ):
        assert expected in message
    unconditional = {**TINY_GAN, "num_classes": 0}
    assert "`model.config.num_classes`: the data has class labels" in problems_of(
        tiny_gan_spec(tmp_path, model__config=unconditional, data__label_column="label")
    )
    assert "`train.d_steps_per_g`: only a GAN has a discriminator" in problems_of(
        tiny_lm_spec(tmp_path, train__d_steps_per_g=2)
    )
    from raygen.jobs.loader import validate_spec

    with pytest.raises(SpecError, match=r"`model.gan_loss` is a GAN's"):
        validate_spec(TrainSpec, tiny_vae_spec(tmp_path, model__gan_loss="hinge"), "v.yaml")


def test_the_checks_know_the_generators_own_defaults():
    from raygen.jobs.gan_facts import DCGAN_DEFAULTS
    from raygen.jobs.models.dcgan import Generator

    parameters = inspect.signature(Generator.__init__).parameters
    assert {k: p.default for k, p in parameters.items() if k != "self"} == DCGAN_DEFAULTS


def test_losses_and_the_r1_penalty():
    from raygen.jobs.models.gan import discriminator_loss, generator_loss, r1_penalty

    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: relu(1 - real) + relu(1 + fake), each averaged
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.25 + 0.75)
    assert generator_loss(fake, "hinge").item() == pytest.approx(0.75)
    softplus = torch.nn.functional.softplus
    expected = softplus(-real).mean() + softplus(fake).mean()
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(expected)
    # A linear critic's gradient is its weight everywhere: the penalty is its squared norm.
    weight = torch.tensor([3.0, 4.0])
    images = torch.randn(5, 2, requires_grad=True)
    assert r1_penalty(images @ weight, images).item() == pytest.approx(25.0)


def test_killed_gan_run_resumes_improves_its_fid_exports_a_plain_pytorch_generator_and_serves(
    ray_session, serve_port, tmp_path, digits_prepared
):
    from typer.testing import CliRunner

    from raygen.cli import app
    from raygen.jobs.eval.fid import load_extractor

    # With the R1 penalty: the discriminator differentiated twice under DeepSpeed.
    raw = tiny_gan_spec(
        tmp_path,
        digits_prepared,
        train__eval_every=50,
        sampling__fid_samples=512,
        model__r1_gamma=0.1,
    )
    outcome, checkpointed, run_dir = run_and_kill_rank0(
        tmp_path, raw, max_failures=1, steps=300, every=100
    )
    result = outcome["result"]
    assert result["status"] == "completed" and result["final_step"] == 300, outcome
    attempts = result["attempts"]
    assert len(attempts) == 2 and attempts[1]["resumed_from_step"] >= max(checkpointed) >= 100
    rows = read_metrics(run_dir / "metrics.jsonl")
    fids = [r["fid"] for r in rows if "fid" in r]
    assert len(fids) == 6 and fids[-1] < 0.6 * fids[0], fids
    scores = [r["is_mean"] for r in rows if "is_mean" in r]  # the classes told apart
    assert len(scores) == 6 and scores[0] < scores[-1] <= 10, scores
    assert all("d_loss" in r for r in rows if "train_loss" in r)
    assert (run_dir / "samples" / "step_000300.png").is_file()

    # The documented plain-PyTorch lines load the export and generate the asked digits,
    # as the data's own classifier (the FID's) reads them.
    model = result["paths"]["model"]
    snippet = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "gan.md").read_text(), re.S)
    scope: dict = {}
    exec(snippet.group(1).replace("runs/NAME/model", model), scope)  # noqa: S102
    assert scope["images"].shape == (16, 1, 8, 8)
    generator = scope["generator"]
    classifier = load_extractor("classifier", str(digits_prepared / "fid"), None).network
    labels = torch.arange(200) % 10
    with torch.no_grad():
        predicted = classifier(generator(torch.randn(200, 32), labels)).argmax(1)
    assert (predicted == labels).float().mean() > 0.5  # chance: 0.1

    runner = CliRunner()
    threes = tmp_path / "threes.png"
    done = runner.invoke(
        app, ["sample", model, "--n", "8", "--class-label", "3", "--out", str(threes)]
    )
    assert done.exit_code == 0 and threes.is_file(), done.output
    bad = runner.invoke(app, ["sample", model, "--class-label", "10"])
    assert bad.exit_code == 2 and "out of range: the model knows classes 0..9" in bad.output

    # The last checkpoint exports the same generator (its EMA).
    exported = tmp_path / "exported"
    done = runner.invoke(app, ["export", str(run_dir), "--out", str(exported)])
    assert done.exit_code == 0, done.output
    from safetensors.torch import load_file

    ours, again = load_file(f"{model}/model.safetensors"), load_file(exported / "model.safetensors")
    assert ours.keys() == again.keys()
    assert all(torch.equal(ours[k], again[k]) for k in ours)

    # Audited on its classes (the FID's classifier reads its samples), then served behind
    # the image API by that audit: one forward pass per batch, the asked class each time.
    import base64
    import io

    import httpx
    from PIL import Image

    from raygen.jobs.loader import validate_spec
    from raygen.serving.audit.run import run_audit
    from raygen.serving.spec import AuditSpec
    from tests.serving.deployments import start, stop

    check = {"metric": "class_accuracy", "classifier": str(digits_prepared),
             "samples_per_class": 16, "min_ratio": 0.5}  # fmt: skip
    raw_audit = {"name": "gan-classes", "min_group_size": 16, "checks": [check]}
    audit = validate_spec(AuditSpec, raw_audit, "audit.yaml")
    report = run_audit(audit, "audit.yaml", model)
    assert report["passed"], report
    url = start("gan", model, serve_port, audit=report["paths"]["audit"])
    try:
        body = {"n": 4, "seed": 3, "class_label": 7}
        answer = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        pixels = [
            np.array(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))
            for item in answer.json()["data"]
        ]
        assert [p.shape for p in pixels] == [(8, 8)] * 4
        batch = torch.tensor(np.stack(pixels))[:, None].float() / 127.5 - 1
        with torch.no_grad():
            assert (classifier(batch).argmax(1) == 7).float().mean() >= 0.5
        steps = httpx.post(
            f"{url}/v1/images/generations", json={**body, "num_inference_steps": 50}, timeout=60
        )
        assert steps.status_code == 400 and steps.json()["error"]["param"] == "num_inference_steps"
    finally:
        stop("gan")


def test_a_generator_export_is_refused_by_generate_and_its_figures_are_printed(tmp_path):
    from typer.testing import CliRunner

    from raygen import render
    from raygen.cli import app
    from raygen.jobs.models.dcgan import Generator
    from raygen.jobs.train.gan import generator_writer

    kwargs = {**TINY_GAN, "base_channels": 4}
    generator_writer(kwargs, Generator(**kwargs).state_dict())(str(tmp_path / "model"))
    done = CliRunner().invoke(
        app, ["generate", str(tmp_path / "model"), "--prompt", "hi"], env={"COLUMNS": "300"}
    )
    assert done.exit_code == 2 and "is a gan model; use raygen sample" in done.output
    line = render.metrics_row({"step": 300, "fid": 2.21, "fid_extractor": "classifier",
                               "is_mean": 9.1, "is_std": 0.2})  # fmt: skip
    assert "fid(classifier) 2.21 is 9.10" in line
    (tmp_path / "model" / "model.safetensors").unlink()  # a half-copied export
    done = CliRunner().invoke(app, ["sample", str(tmp_path / "model")], env={"COLUMNS": "300"})
    assert done.exit_code == 2 and "is not a whole GAN export" in done.output, done.output

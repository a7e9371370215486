"""Latent diffusion with a DiT: spec errors, sampling as DiTPipeline samples, and a real
2-worker ZeRO-3 run on a trained VAE's latents that is killed, resumes, improves its FID,
exports a DiTPipeline plain diffusers generates the asked classes with, and is audited and
served."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from raygen.jobs.errors import SpecError
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train.metrics import read_metrics
from raygen.jobs.validate import validate_train_spec
from tests.conftest import TINY_DIT, TINY_VAE, run_and_kill_rank0, tiny_dit_spec

ROOT = Path(__file__).resolve().parents[2]


def problems_of(raw: dict) -> str:
    with pytest.raises(SpecError) as info:
        validate_train_spec(TrainSpec.model_validate(raw), "spec.yaml")
    return str(info.value)


@pytest.fixture(scope="module")
def random_vae(tmp_path_factory) -> str:
    """An untrained tiny AutoencoderKL saved as diffusers saves one (latents 4x4x4)."""
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("vae") / "model"
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(path)
    return str(path)


def test_dit_spec_problems_are_all_reported_at_once(tmp_path, random_vae):
    raw = tiny_dit_spec(
        tmp_path,
        random_vae,
        model__config={**TINY_DIT, "num_layer": 2, "in_channels": 3, "num_embeds_ada_norm": 10},
        data__random_flip=True,
    )
    message = problems_of(raw)
    for expected in (
        "`model.config.num_layer`: not a parameter of DiTTransformer2DModel; did you mean "
        "`num_layers`?",
        "`model.config.in_channels`: 3, but it must be 4: the VAE's latent channels",
        "`model.config.num_embeds_ada_norm`: 10, but DiTPipeline guides with label 1000",
        "`data.random_flip`: a DiT trains on latents encoded once",
    ):
        assert expected in message
    # The latent size follows the VAE: 8x8 images, two blocks -> 4x4 latents.
    odd_patch = problems_of(tiny_dit_spec(tmp_path, random_vae, model__config={"patch_size": 3}))
    assert "`model.config.patch_size`: 3 does not divide the latent size 4" in odd_patch

    unlabelled = tiny_dit_spec(tmp_path, random_vae)
    parquet = tmp_path / "images.parquet"
    import pyarrow.parquet as pq

    from raygen.jobs.data.images import digits_table

    pq.write_table(digits_table().select(["image"]).slice(0, 8), parquet)
    unlabelled["data"]["train"] = str(parquet)
    assert "a DiT is class-conditional" in problems_of(unlabelled)

    not_a_vae = tiny_dit_spec(tmp_path, str(tmp_path))
    assert f"`model.vae`: {tmp_path} is not a VAE directory" in problems_of(not_a_vae)
    with pytest.raises(ValueError, match="a DiT is trained on a VAE's latents"):
        TrainSpec.model_validate(tiny_dit_spec(tmp_path, None))  # type: ignore[arg-type]
    # VAEs DiTPipeline would decode wrongly, or that are not VAEs, are named.
    odd = tmp_path / "odd-vae"
    odd.mkdir()
    (odd / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    for config, expected in (
        ("{not json", "config.json is not valid JSON"),
        ('{"_class_name": "UNet2DModel"}', "holds a UNet2DModel, not an AutoencoderKL"),
        ('{"_class_name": "AutoencoderKL", "sample_size": [8, 16]}', "sample_size is one integer"),
        ('{"_class_name": "AutoencoderKL", "shift_factor": 0.1}', "shifts its latents"),
    ):  # fmt: skip
        (odd / "config.json").write_text(config)
        assert expected in problems_of(tiny_dit_spec(tmp_path, str(odd))), config

    # A saved DiT is not a UNet to fine-tune: the message says what to do instead.
    from diffusers import AutoencoderKL

    from raygen.jobs.dit_facts import dit_config
    from raygen.jobs.models.diffusion import build_pipeline
    from raygen.jobs.models.dit import build_dit
    from raygen.jobs.spec import NoiseSchedulerSpec

    pipe = tmp_path / "dit-pipe"
    net = build_dit(dit_config(TINY_DIT, (4, 4, 4)))
    vae = AutoencoderKL.from_pretrained(random_vae)
    build_pipeline(net, NoiseSchedulerSpec(), vae, classes=10).save_pretrained(pipe)
    fine_tune = tiny_dit_spec(tmp_path, random_vae)
    fine_tune["model"] = {"family": "diffusion", "pretrained": str(pipe)}
    assert "is a DiT; fine-tuning a saved DiT is not supported" in problems_of(fine_tune)

    unet = tiny_dit_spec(tmp_path, random_vae)
    unet["model"] = {"family": "diffusion", "arch": "unet2d", "vae": random_vae}
    with pytest.raises(ValueError, match="`model.vae` is the latent space of a latent diffusion"):
        TrainSpec.model_validate(unet)


def test_guided_sampling_is_dit_pipelines_own(tmp_path, random_vae):
    """raygen's sampler (training's evaluations, `raygen sample`, serving) makes the images
    DiTPipeline makes from the same noise, classifier-free guidance included."""
    from diffusers import AutoencoderKL, DiTPipeline

    from raygen.jobs.dit_facts import NULL_CLASS, dit_config
    from raygen.jobs.models.diffusion import build_noise_scheduler, build_pipeline, generate
    from raygen.jobs.models.dit import build_dit, decode_scaled
    from raygen.jobs.spec import NoiseSchedulerSpec

    torch.manual_seed(0)
    net = build_dit(dit_config(TINY_DIT, (4, 4, 4)))
    for p in net.parameters():  # DiT's zero initialisation predicts nothing: perturb it
        p.data += 0.05 * torch.randn_like(p)
    vae = AutoencoderKL.from_pretrained(random_vae)
    vae.register_to_config(scaling_factor=0.7)
    schedule = NoiseSchedulerSpec(type="ddim", num_train_timesteps=100)
    build_pipeline(net.eval(), schedule, vae, classes=10).save_pretrained(tmp_path / "pipe")
    pipe = DiTPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.labels == {str(i): i for i in range(10)}
    from raygen.jobs.sampling import load_diffusion

    loaded = load_diffusion(str(tmp_path / "pipe"))  # what `raygen sample` and serving load
    assert (loaded.shape, loaded.image_shape, loaded.classes) == ((4, 4, 4), (1, 8, 8), 10)

    labels = [3, 7]
    expected = pipe(
        labels, guidance_scale=4.0, generator=torch.manual_seed(5), num_inference_steps=6,
        output_type="pt",
    ).images  # fmt: skip
    noise = torch.randn((2, 4, 4, 4), generator=torch.manual_seed(5))
    latents = generate(
        pipe.transformer, build_noise_scheduler(schedule, latent=True), noise,
        torch.tensor(labels), 6, guidance_scale=4.0, null_class=NULL_CLASS,
    )  # fmt: skip
    ours = (decode_scaled(pipe.vae, latents) + 1) / 2
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    unguided = generate(
        pipe.transformer, build_noise_scheduler(schedule, latent=True), noise,
        torch.tensor(labels), 6,
    )  # fmt: skip
    assert not torch.allclose(unguided, latents, atol=1e-3)  # guidance changed something


def test_killed_dit_run_on_vae_latents_resumes_exports_a_dit_pipeline_and_serves(
    ray_session, serve_port, tmp_path, vae_run
):
    from diffusers import DiTPipeline
    from typer.testing import CliRunner

    from raygen.cli import app
    from raygen.jobs.eval.fid import load_extractor

    vae_outcome, _, _ = vae_run
    vae = vae_outcome["result"]["paths"]["model"]
    prepared = tmp_path / "latents"
    # ZeRO-3: the transformer and its EMA partitioned over the workers, gathered to sample
    # (every rank denoises its share) and to export.
    raw = tiny_dit_spec(
        tmp_path, vae, prepared, train__eval_every=50, deepspeed__zero_stage=3,
        sampling__fid_samples=128,
    )  # fmt: skip
    outcome, checkpointed, run_dir = run_and_kill_rank0(
        tmp_path, raw, max_failures=1, steps=200, every=100
    )
    result = outcome["result"]
    assert result["status"] == "completed" and result["final_step"] == 200, outcome
    attempts = result["attempts"]
    assert len(attempts) == 2 and attempts[1]["resumed_from_step"] >= max(checkpointed) >= 100
    stats = json.loads((prepared / "data_stats.json").read_text())
    assert stats["latent_shape"] == [4, 4, 4] and stats["num_classes"] == 10
    rows = read_metrics(run_dir / "metrics.jsonl")
    fids = [r["fid"] for r in rows if "fid" in r]
    assert len(fids) == 4 and fids[-1] < 0.8 * fids[0], fids
    assert (run_dir / "samples" / "step_000200.png").is_file()

    # Plain diffusers: DiTPipeline loads the export (transformer, VAE, scheduler, class
    # names) and generates the asked digits, as the data's own classifier reads them.
    model = result["paths"]["model"]
    snippet = re.search(
        r"```python\n(.*?)```", (ROOT / "docs" / "latent-diffusion.md").read_text(), re.S
    )
    scope: dict = {}
    exec(snippet.group(1).replace("runs/NAME/model", model), scope)  # noqa: S102
    assert [image.size for image in scope["images"]] == [(8, 8)] * 2
    pipe = scope["pipe"]
    assert pipe.labels["7"] == 7
    labels = [i % 10 for i in range(100)]
    images = pipe(
        labels, generator=torch.manual_seed(0), num_inference_steps=10, output_type="pt"
    ).images  # (100, 1, 8, 8) in [0, 1]
    classifier = load_extractor("classifier", str(prepared / "fid"), None).network
    with torch.no_grad():
        predicted = classifier(images * 2 - 1).argmax(1)
    accuracy = (predicted == torch.tensor(labels)).float().mean().item()
    assert accuracy > 0.5, accuracy  # chance: 0.1

    runner = CliRunner()
    sevens = tmp_path / "sevens.png"
    done = runner.invoke(
        app, ["sample", model, "--n", "8", "--class-label", "7", "--out", str(sevens)]
    )
    assert done.exit_code == 0 and sevens.is_file(), done.output
    bad = runner.invoke(app, ["sample", model, "--class-label", "10"])
    assert bad.exit_code == 2 and "out of range: the model knows classes 0..9" in bad.output

    # The last checkpoint exports the same transformer (its EMA) beside the same VAE.
    exported = tmp_path / "exported"
    done = runner.invoke(app, ["export", str(run_dir), "--out", str(exported)])
    assert done.exit_code == 0, done.output
    again = DiTPipeline.from_pretrained(exported)
    for (name, a), b in zip(
        pipe.transformer.state_dict().items(), again.transformer.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3, msg=name)  # bf16-gathered
    assert again.vae.config.scaling_factor == pipe.vae.config.scaling_factor

    # Its lineage names the VAE whose latents it learned, unchanged since.
    from raygen.serving.lineage import lineage

    traced = lineage(model)["links"]["prepared_data"]["latent_vae"]
    assert traced["path"] == vae and traced["unchanged"], traced
    printed = runner.invoke(app, ["lineage", model])
    assert printed.exit_code == 0 and "latents encoded by the VAE" in printed.output

    # Audited on its classes, then served behind the image API by that audit.
    import httpx
    from PIL import Image

    from raygen.jobs.loader import validate_spec
    from raygen.serving.audit.run import run_audit
    from raygen.serving.spec import AuditSpec
    from tests.serving.deployments import start, stop

    check = {"metric": "class_accuracy", "classifier": str(prepared),
             "samples_per_class": 16, "min_ratio": 0.3, "num_inference_steps": 10}  # fmt: skip
    raw_audit = {"name": "dit-classes", "min_group_size": 16, "checks": [check]}
    audit = validate_spec(AuditSpec, raw_audit, "audit.yaml")
    report = run_audit(audit, "audit.yaml", model)
    assert report["passed"], report
    url = start("dit", model, serve_port, audit=report["paths"]["audit"])
    try:
        # The size is the images' (8x8), not the latents' the transformer denoises (4x4).
        body = {"n": 4, "seed": 3, "class_label": 7, "num_inference_steps": 10, "size": "8x8"}
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
        guided = httpx.post(
            f"{url}/v1/images/generations", json={**body, "guidance_scale": 1.0}, timeout=60
        )
        assert guided.status_code == 200 and guided.json() != answer.json()
        too_much = httpx.post(
            f"{url}/v1/images/generations", json={**body, "guidance_scale": 0.5}, timeout=60
        )
        assert too_much.status_code == 400
        assert too_much.json()["error"]["param"] == "guidance_scale"
    finally:
        stop("dit")

"""Diffusion models: FID math, image preparation, spec errors, and real 2-worker runs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from raygen.jobs.errors import SpecError
from raygen.jobs.launch import launch
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train.metrics import read_metrics
from raygen.jobs.validate import validate_train_spec
from tests.conftest import KILL_RUN_STEPS, TINY_UNET, run_and_kill_rank0, tiny_diffusion_spec


def spec_of(raw: dict) -> TrainSpec:
    return TrainSpec.model_validate(raw)


def png(pixels: np.ndarray, **save_options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


# --- FID ----------------------------------------------------------------------------------


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    from raygen.jobs.eval.fid import frechet_distance

    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # For commuting covariances: |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_on_general_covariances():
    from scipy import linalg

    from raygen.jobs.eval.fid import feature_statistics, frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    root = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


# --- images -------------------------------------------------------------------------------


def test_inception_score_spans_one_to_the_number_of_classes():
    from raygen.jobs.eval.fid import inception_score

    uniform = np.full((100, 10), 0.1)  # the classifier cannot tell the images apart
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(100) % 10]  # sure of each, classes evenly spread
    assert inception_score(confident) == pytest.approx((10.0, 0.0), abs=1e-6)
    collapsed = np.eye(10)[np.zeros(100, int)]  # sure, but always the same class
    assert inception_score(collapsed)[0] == pytest.approx(1.0)


def test_images_are_resized_on_the_short_side_and_center_cropped():
    from raygen.jobs.data.images import fit_image, image_bytes

    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # a white center third
    out = fit_image(png(wide), channels=3, size=10)
    assert out.shape == (3, 10, 10) and out.min() > 200  # only the center survives the crop
    gray = fit_image(png(wide), channels=1, size=5)
    assert gray.shape == (1, 5, 5)
    assert image_bytes({"bytes": b"x", "path": "a.png"}) == b"x" and image_bytes(None) is None


def test_image_grid_tiles_rows_of_images():
    from raygen.jobs.sampling import image_grid

    grid = image_grid(np.zeros((5, 4, 4, 1), np.uint8), columns=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 1)


@pytest.fixture(scope="module")
def image_parquet(tmp_path_factory) -> tuple[Path, dict]:
    """20 distinct labelled images as `{bytes, path}` structs, plus 3 duplicates (one of them
    re-encoded with other PNG settings: same pixels, other bytes) and 2 undecodable rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12, 12), dtype=np.uint8) for _ in range(20)]
    rows = [(png(img), i % 4) for i, img in enumerate(images)]
    rows += [(png(images[0]), 0), (png(images[1], compress_level=0), 1), (png(images[2]), 2)]
    rows += [(b"not an image", 3), (b"", 3)]
    path = tmp_path_factory.mktemp("images") / "images.parquet"
    cells = [{"bytes": data, "path": f"{i}.png"} for i, (data, _) in enumerate(rows)]
    pq.write_table(pa.table({"img": cells, "digit": [label for _, label in rows]}), path)
    return path, {"rows_in": 25, "removed_duplicates": 3, "removed_undecodable": 2, "rows_out": 20}


def test_image_prep_decodes_dedupes_by_pixels_and_counts(ray_session, tmp_path, image_parquet):
    from raygen.jobs.data.images import read_prepared_pixels
    from raygen.jobs.data.prepare import prepare_data

    path, expected = image_parquet
    raw = tiny_diffusion_spec(
        tmp_path,
        data={"train": str(path), "image_column": "img", "label_column": "digit"},
        model__config={**TINY_UNET, "num_class_embeds": 4},
    )
    raw["data"]["eval_fraction"] = 0.3
    spec = validate_train_spec(spec_of(raw), "test")
    heard: list[tuple] = []
    stats = prepare_data(spec, str(tmp_path / "prepared"), report=lambda *a: heard.append(a))
    assert heard[0] == ("decode images", 0, stats["rows_in"])  # counted in Ray Data's tasks
    assert heard[-1] == ("decode images", stats["rows_in"], stats["rows_in"])
    for key, value in expected.items():
        assert stats[key] == value, key
    assert stats["train_examples"] + stats["eval_examples"] == 20
    assert stats["image_shape"] == [1, 8, 8] and stats["num_classes"] == 4
    assert stats["fid"]["extractor"] == "classifier"  # auto: the data has labels
    pixels, labels = read_prepared_pixels(str(tmp_path / "prepared"), "train", (1, 8, 8))
    assert pixels.dtype.is_floating_point is False and pixels.shape[1:] == (1, 8, 8)
    assert set(labels.tolist()) <= {0, 1, 2, 3}
    again = prepare_data(spec, str(tmp_path / "prepared"))
    assert again["fingerprint"] == stats["fingerprint"]  # up to date: not redone


def test_an_image_column_named_image_without_labels_prepares_and_trains(ray_session, tmp_path):
    """The usual column name, no label column: Ray Data refuses an empty rename."""
    import pyarrow.parquet as pq

    from raygen.jobs.data.images import digits_table

    path = tmp_path / "unlabelled.parquet"
    pq.write_table(digits_table().select(["image"]).slice(0, 400), path)
    raw = tiny_diffusion_spec(
        tmp_path,
        data={"train": str(path), "eval_fraction": 0.2},
        train__max_steps=4,
        train__warmup_steps=1,
        train__eval_every=4,
        train__checkpoint_every=4,
        train__log_every=2,
        sampling={"steps": 2, "grid_images": 4, "fid_samples": 0},
        scaling={"num_workers": 1},
    )
    result = launch(spec_of(raw))
    assert result["status"] == "completed" and result["final_step"] == 4
    assert (Path(result["paths"]["model"]) / "model_index.json").is_file()
    # One worker, by default: the whole (2-CPU) machine, a PyTorch thread per CPU.
    assert result["resources"]["per_worker"] == {"CPU": 2}
    assert result["attempts"][0]["torch_threads"] == 2


# --- spec errors --------------------------------------------------------------------------


def problems_of(raw: dict) -> str:
    with pytest.raises(SpecError) as info:
        validate_train_spec(spec_of(raw), "spec.yaml")
    return str(info.value)


def test_sample_size_must_survive_the_unets_downsampling(tmp_path):
    raw = tiny_diffusion_spec(tmp_path, model__config={**TINY_UNET, "sample_size": 9})
    assert "`model.config.sample_size`: 9 is not divisible by 2^1 = 2" in problems_of(raw)


def test_labels_need_class_embeddings_and_vice_versa(tmp_path, image_parquet):
    path = str(image_parquet[0])
    data = {"train": path, "image_column": "img", "label_column": "digit"}
    message = problems_of(tiny_diffusion_spec(tmp_path, data=data))
    assert "`model.config.num_class_embeds`: the data has class labels" in message
    unlabelled = {"train": path, "image_column": "img"}
    raw = tiny_diffusion_spec(
        tmp_path, data=unlabelled, model__config={**TINY_UNET, "num_class_embeds": 4}
    )
    message = problems_of(raw)
    assert "`data.label_column`: the UNet is class-conditional" in message


def test_diffusion_spec_problems_are_all_reported_at_once(tmp_path, image_parquet):
    raw = tiny_diffusion_spec(
        tmp_path,
        data={"train": str(image_parquet[0]), "image_column": "pixels", "dedupe": "near"},
        model__config={**TINY_UNET, "sample_sise": 8},
        sampling={"fid_extractor": "inception"},
        tokenizer={"train": {"vocab_size": 300}},
    )
    message = problems_of(raw)
    for expected in (
        "`model.config.sample_sise`: not a parameter of UNet2DModel; did you mean `sample_size`?",
        "`sampling.inception_weights`: fid_extractor inception needs the path",
        "`data.dedupe`: near-duplicate detection is for text",
        "`tokenizer`: diffusion models have no tokenizer",
        "has no column 'pixels'; its columns are img, digit",
    ):
        assert expected in message


def test_families_and_builtin_data_sets_must_match(tmp_path):
    raw = tiny_diffusion_spec(tmp_path, data={"train": "builtin:python-stdlib"})
    assert "builtin:python-stdlib is text; a diffusion model trains on images" in problems_of(raw)
    from tests.conftest import tiny_lm_spec

    lm = tiny_lm_spec(tmp_path, data={"train": "builtin:digits"}, model__ema={"decay": 0.9})
    message = problems_of(lm)
    assert "builtin:digits is an image data set" in message
    assert "`model.ema`: only diffusion models have a ema" in message


# --- real runs ----------------------------------------------------------------------------


def test_two_worker_run_lowers_the_loss_and_logs_fid_and_samples(diffusion_run):
    _, result = diffusion_run
    assert result["status"] == "completed" and result["final_step"] == 40
    rows = read_metrics(Path(result["paths"]["metrics"]))
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    assert train[-1] < 0.6 * train[0]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert all(r["fid_extractor"] == "classifier" and r["fid"] > 0 for r in evals)
    # The Inception Score of the classifier's probabilities: between 1 and the 10 classes.
    assert all(1 <= r["is_mean"] <= 10 and r["is_std"] >= 0 for r in evals)
    assert {"lr", "samples_per_s", "step_time_s"} <= set(rows[0])
    samples = sorted(Path(result["paths"]["samples"]).glob("*.png"))
    assert [p.name for p in samples] == ["step_000020.png", "step_000040.png"]


def test_exported_pipeline_loads_with_plain_diffusers_and_generates(diffusion_run):
    from diffusers import DDPMPipeline

    _, result = diffusion_run
    pipeline = DDPMPipeline.from_pretrained(result["paths"]["model"])
    images = pipeline(batch_size=2, num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_export_holds_the_ema_weights(diffusion_run):
    """The EMA decays to the latest weights: export and final checkpoint differ, slightly."""
    import torch
    from diffusers import UNet2DModel

    _, result = diffusion_run
    exported = UNet2DModel.from_pretrained(Path(result["paths"]["model"]) / "unet")
    checkpoint = Path(result["paths"]["checkpoint"])
    ema_files = sorted((checkpoint / "rank_state").glob("rank_*.pt"))
    assert [p.name for p in ema_files] == ["rank_00000.pt", "rank_00001.pt"]
    shadow = torch.load(ema_files[0], weights_only=True)["ema"]["shadow"]
    for saved, param in zip(shadow, exported.parameters(), strict=True):
        torch.testing.assert_close(saved, param.detach())


def test_conditional_zero3_bf16_run_samples_each_class(ray_session, tmp_path, digits_prepared):
    """ZeRO-3 partitions the UNet and its EMA; `raygen sample` draws a chosen digit."""
    from typer.testing import CliRunner

    from raygen.cli import app

    raw = tiny_diffusion_spec(
        tmp_path,
        digits_prepared,
        model__config={**TINY_UNET, "num_class_embeds": 10},
        deepspeed__zero_stage=3,
        train__precision="bf16",
        train__max_steps=20,
        sampling__grid_images=10,
    )
    result = launch(spec_of(raw))
    assert result["status"] == "completed"
    model_dir = result["paths"]["model"]
    config = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    assert config["num_class_embeds"] == 10
    # The export is the EMA, gathered from both ranks' partitions of it (bf16 precision).
    import torch
    from diffusers import UNet2DModel

    exported = list(UNet2DModel.from_pretrained(Path(model_dir) / "unet").parameters())
    state = Path(result["paths"]["checkpoint"]) / "rank_state"
    shards = [torch.load(state / f"rank_{r:05d}.pt")["ema"]["shadow"] for r in (0, 1)]
    for param, *parts in zip(exported, *shards, strict=True):
        full = torch.cat(parts)[: param.numel()].view(param.shape)
        torch.testing.assert_close(param.detach(), full, rtol=2e-2, atol=2e-2)

    runner = CliRunner()
    grid = tmp_path / "grid.png"
    done = runner.invoke(
        app,
        ["sample", model_dir, "--n", "4", "--steps", "5", "--class-label", "3",
         "--out", str(grid), "--out-dir", str(tmp_path / "each")],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert grid.is_file()
    assert sorted(p.name for p in (tmp_path / "each").glob("*.png"))[0] == "sample_0000_class3.png"
    bad = runner.invoke(app, ["sample", model_dir, "--class-label", "12"])
    assert bad.exit_code == 2 and "out of range: the model knows classes 0..9" in bad.output
    guided = runner.invoke(app, ["sample", model_dir, "--guidance-scale", "3"])
    assert guided.exit_code == 2 and "this UNet generates without it" in guided.output


def test_killed_diffusion_worker_is_replaced_and_training_resumes(
    ray_session, tmp_path, digits_prepared
):
    raw = tiny_diffusion_spec(tmp_path, digits_prepared, train__eval_every=1000)
    outcome, checkpointed, run_dir = run_and_kill_rank0(tmp_path, raw, max_failures=1)
    result = outcome["result"]
    assert result["status"] == "completed" and result["final_step"] == KILL_RUN_STEPS
    attempts = result["attempts"]
    assert len(attempts) == 2 and attempts[1]["resumed_from_step"] >= max(checkpointed) >= 10


def test_fine_tune_starts_from_an_exported_pipeline(
    ray_session, tmp_path, diffusion_run, digits_prepared
):
    _, base = diffusion_run
    stats_before = (digits_prepared / "data_stats.json").read_text()
    raw = tiny_diffusion_spec(
        tmp_path,
        digits_prepared,  # the same images: prepared once, whichever weights start
        model={"family": "diffusion", "pretrained": base["paths"]["model"]},
        train__max_steps=5,
        train__warmup_steps=0,
        train__eval_every=5,
        sampling__fid_samples=0,
    )
    result = launch(spec_of(raw))
    assert (digits_prepared / "data_stats.json").read_text() == stats_before  # not redone
    first_base = read_metrics(Path(base["paths"]["metrics"]))[0]["train_loss"]
    first_tuned = read_metrics(Path(result["paths"]["metrics"]))[0]["train_loss"]
    assert first_tuned < 0.7 * first_base  # trained weights, not a fresh UNet


def test_inception_extractor_is_a_local_torchscript_file(tmp_path):
    """raygen feeds it 3-channel 299x299 images in [0, 255] and takes (N, D) features."""
    import torch

    from raygen.jobs.eval.fid import load_extractor

    class Probe(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            # (N, 3, 299, 299) -> (N, 4): size, channels and value range, as features
            n = images.shape[0]
            return torch.stack(
                [
                    torch.full((n,), float(images.shape[-1])),
                    torch.full((n,), float(images.shape[1])),
                    images.amin(dim=(1, 2, 3)),
                    images.amax(dim=(1, 2, 3)),
                ],
                dim=1,
            )

    path = tmp_path / "inception.pt"
    torch.jit.script(Probe()).save(str(path))
    extractor = load_extractor("inception", str(tmp_path), str(path))
    images = torch.linspace(-1, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)
    features = extractor(images)
    assert features.shape == (2, 4)
    assert features[0, 0] == 299 and features[0, 1] == 3
    assert features[:, 2].min() >= 0 and features[:, 3].max() <= 255


def test_an_inception_returning_logits_too_gives_an_inception_score(tmp_path):
    """A TorchScript Inception that returns (features, logits) scores samples: the softmax
    of its logits is what the Inception Score is computed from."""
    import torch

    from raygen.jobs.eval.fid import (
        SampleFid,
        feature_statistics,
        inception_score,
        load_extractor,
        reference_file,
    )

    class TwoHeads(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Features: mean brightness per channel; logits: three classes by brightness.
            features = images.mean(dim=(2, 3)) / 255  # (N, 3)
            level = features.mean(1, keepdim=True)
            centres = torch.tensor([[0.2, 0.5, 0.8]])
            return features, -((level - centres) ** 2) * 400

    path = tmp_path / "inception.pt"
    torch.jit.script(TwoHeads()).save(str(path))
    levels = torch.tensor([-0.6, 0.0, 0.6]).repeat(20)  # three brightness classes in turn
    images = levels[:, None, None, None].expand(60, 1, 8, 8)
    extractor = load_extractor("inception", str(tmp_path), str(path))
    features, probabilities = extractor.run(images)
    assert features.shape == (60, 3) and probabilities.shape == (60, 3)
    assert (probabilities.argmax(1) == np.arange(60) % 3).all()

    fid_dir = tmp_path / "prepared" / "fid"
    fid_dir.mkdir(parents=True)
    mu, sigma = feature_statistics(features)
    np.savez(fid_dir / reference_file("inception"), mu=mu, sigma=sigma)
    row = SampleFid(str(tmp_path / "prepared"), "inception", str(path))(images)
    assert row["fid"] == pytest.approx(0, abs=1e-6)
    assert row["is_mean"] == pytest.approx(inception_score(probabilities)[0])
    assert row["is_mean"] > 2.5  # three confident, evenly spread classes: close to 3

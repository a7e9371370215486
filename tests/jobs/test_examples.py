"""Every shipped example spec parses and passes the checks made before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from raygen.jobs.loader import load_spec
from raygen.jobs.spec import TrainSpec
from raygen.jobs.validate import validate_train_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "jobs" / "examples").glob("*.yaml"))


@pytest.fixture
def example_bucket(s3_endpoint):
    """`s3://raygen-examples` on the test S3 server, with one Parquet shard of images."""
    import io

    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    client = boto3.client("s3")
    if "raygen-examples" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="raygen-examples")
    image = io.BytesIO()
    Image.new("RGB", (300, 260)).save(image, format="JPEG")
    shard = io.BytesIO()
    pq.write_table(pa.table({"image": [{"bytes": image.getvalue(), "path": "0.jpg"}]}), shard)
    client.put_object(
        Bucket="raygen-examples", Key="images/train/part-0.parquet", Body=shard.getvalue()
    )


@pytest.fixture
def base_models(tmp_path, monkeypatch):
    """The examples' relative paths resolved as from the repository, where the models other
    examples build on (code-lm-tiny.yaml's LM, digits-vae.yaml's VAE) are saved untrained."""
    from tests.serving.test_engine import _save_model

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "jobs").symlink_to(root / "jobs")
    _save_model(
        tmp_path / "runs" / "code-lm-tiny" / "model", "gpt2", n_layer=1, n_embd=16, n_head=2
    )
    # The VAE digits-dit.yaml trains on: digits-vae.yaml's, untrained.
    from diffusers import AutoencoderKL

    vae = load_spec(TrainSpec, root / "jobs" / "examples" / "digits-vae.yaml").model.config
    AutoencoderKL(**vae).save_pretrained(tmp_path / "runs" / "digits-vae" / "model")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path, example_bucket, base_models):
    spec = validate_train_spec(load_spec(TrainSpec, path), str(path))
    assert spec.name == path.stem


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {
        "code-lm-tiny.yaml",
        "llama-7b-zero3.yaml",
        "digits-ddpm.yaml",
        "digits-vae.yaml",
        "digits-gan.yaml",
        "digits-dit.yaml",
        "unet256-s3-zero2.yaml",
        "capitals-lora.yaml",
    }


def test_large_diffusion_example_is_the_size_it_claims():
    from raygen.jobs.models.diffusion import build_unet

    spec = load_spec(TrainSpec, EXAMPLES[[p.name for p in EXAMPLES].index("unet256-s3-zero2.yaml")])
    params = sum(p.numel() for p in build_unet(spec.model).parameters())
    assert 1.0e8 < params < 1.3e8


def test_large_example_is_the_size_it_claims():
    from transformers import AutoConfig

    spec = load_spec(TrainSpec, EXAMPLES[[p.name for p in EXAMPLES].index("llama-7b-zero3.yaml")])
    config = AutoConfig.for_model(spec.model.arch, vocab_size=32000, **spec.model.config)
    h, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    params = 2 * 32000 * h + layers * (4 * h * h + 3 * h * ffn)
    assert 6.5e9 < params < 7.0e9

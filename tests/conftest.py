"""Shared fixtures: one local Ray for the whole session, the moto S3 server, tiny specs
and the models trained once for every test that needs one; the integration mark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raygen.cluster.simulate import free_port
from tests.servers import start_azurite, start_gcs_emulator, stop

ROOT = Path(__file__).resolve().parents[1]


def raygen(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """`raygen ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "raygen", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


# API keys for serving tests: set before the session's Ray starts, so replicas inherit them.
TEST_API_KEYS_ENV = "RAYGEN_TEST_API_KEYS"
TEST_API_KEYS = ("sk-test-alpha-5f3e", "sk-test-beta-91c2")
os.environ[TEST_API_KEYS_ENV] = ",".join(TEST_API_KEYS)


# Tests that use these start real components (a local Ray, the moto S3 server, a trained
# model): they are integration tests. `make test-fast` runs the others (`-m "not
# integration"`); a test that starts such a component itself carries the mark by hand.
INTEGRATION_FIXTURES = {
    "s3_endpoint",
    "cloud_base",
    "gcs_endpoint",
    "azure_endpoint",
    "bucket",
    "ray_session",
    "serve_port",
    "shared_prepared",
    "digits_prepared",
    "lm_run",
    "base_model",
    "chat_run",
    "lora_chat_run",
    "diffusion_run",
    # the modules' own: clusters of raylets, fault proxies, small disks, S3 with credentials
    "cluster",
    "nodes",
    "chaos_ray",
    "proxy",
    "small_disk",
    "authenticating_s3",
    "example_bucket",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 protocol server (moto) on 127.0.0.1, with dummy credentials in the env.

    Started before Ray so that Ray's workers inherit the endpoint and credentials.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture(scope="session")
def gcs_endpoint():
    """A real Google Cloud Storage protocol server (gcp-storage-emulator) on 127.0.0.1,
    named in STORAGE_EMULATOR_HOST (started before Ray, like the S3 server)."""
    server, endpoint = start_gcs_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "raygen-test")  # to create buckets
    yield endpoint
    stop(server)


@pytest.fixture(scope="session")
def azure_endpoint(tmp_path_factory):
    """A real Azure Blob Storage protocol server (Azurite, from npm: `make test` installs
    it) on 127.0.0.1, its development account in AZURE_STORAGE_CONNECTION_STRING."""
    server, endpoint, connection = start_azurite(tmp_path_factory.mktemp("azurite"))
    os.environ["AZURE_STORAGE_CONNECTION_STRING"] = connection
    yield endpoint
    stop(server)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint, gcs_endpoint, azure_endpoint):
    """One local Ray (2 CPUs, like CI) shared by every test that trains."""
    import ray

    from raygen.cluster.connection import connect

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # With the dashboard: Ray Train's placement-group cleanup needs it. Metrics exported on
    # a known port so serving tests can read what Prometheus would scrape.
    ray.init(num_cpus=2, log_to_driver=False, _metrics_export_port=free_port())
    connect()  # no-op on an initialized Ray; applies raygen's logging defaults
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    """The port of Serve's HTTP proxy: one per Ray cluster, so one for the whole session."""
    yield free_port()
    from ray import serve

    serve.shutdown()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the test S3 endpoint; returns its name."""
    import uuid

    import boto3

    name = f"raygen-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


CLOUDS = ("s3", "gs", "abfs")


@pytest.fixture(params=CLOUDS)
def cloud_base(request) -> str:
    """A fresh, empty bucket (container) on each cloud's test server, as a URI: s3://B,
    gs://B and abfs://C@devstoreaccount1.dfs.core.windows.net (Azurite's account)."""
    import uuid

    from raygen.cluster.storage import resolve

    name = f"raygen-{uuid.uuid4().hex[:12]}"
    request.getfixturevalue({"s3": "s3_endpoint", "gs": "gcs_endpoint",
                             "abfs": "azure_endpoint"}[request.param])  # fmt: skip
    uri = {
        "s3": f"s3://{name}",
        "gs": f"gs://{name}",
        "abfs": f"abfs://{name}@devstoreaccount1.dfs.core.windows.net",
    }[request.param]
    if request.param == "s3":
        import boto3

        boto3.client("s3").create_bucket(Bucket=name)
    else:
        fs, path = resolve(uri)
        fs.create_dir(path)  # a bucket, or a container
    return uri


@pytest.fixture(scope="session")
def shared_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared-data dir shared by tests with the same data options (prepared once)."""
    return tmp_path_factory.mktemp("prepared") / "data"


def tiny_lm_spec(tmp_path: Path, prepared: Path | None = None, **overrides) -> dict:
    """A spec for a ~100k-parameter GPT-2 on a slice of the stdlib: trains in seconds.

    `overrides` use double underscores for dots: train__max_steps=10.
    """
    spec = {
        "name": "tiny",
        "model": {"arch": "gpt2", "config": {"n_layer": 2, "n_embd": 64, "n_head": 4}},
        "data": {
            "train": "builtin:python-stdlib",
            "seq_len": 64,
            "max_bytes": 600_000,
            "eval_fraction": 0.2,
        },
        "tokenizer": {"train": {"vocab_size": 512}},
        "train": {
            "max_steps": 40,
            "micro_batch_size": 8,
            "lr": 3e-3,
            "warmup_steps": 4,
            "log_every": 5,
            "eval_every": 20,
            "eval_batches": 4,
            "checkpoint_every": 20,
        },
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"storage": str(tmp_path / "runs"), "keep_checkpoints": 2},
    }
    if prepared is not None:
        spec["data"]["prepared"] = str(prepared)
    return with_overrides(spec, overrides)


TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}


def tiny_diffusion_spec(tmp_path: Path, prepared: Path | None = None, **overrides) -> dict:
    """A ~60k-parameter UNet on the 8x8 digits: a 2-worker run takes seconds per 10 steps."""
    spec = {
        "name": "tiny-ddpm",
        "model": {
            "family": "diffusion",
            "arch": "unet2d",
            "config": dict(TINY_UNET),
            "scheduler": {"num_train_timesteps": 200, "beta_schedule": "squaredcos_cap_v2"},
            "ema": {"decay": 0.99},
        },
        "data": {"train": "builtin:digits", "eval_fraction": 0.1},
        "train": {
            "max_steps": 40,
            "micro_batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 5,
            "weight_decay": 0.0,
            "log_every": 5,
            "eval_every": 20,
            "eval_batches": 2,
            "checkpoint_every": 20,
        },
        "sampling": {"steps": 10, "grid_images": 16, "fid_samples": 64},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"storage": str(tmp_path / "runs")},
    }
    if prepared is not None:
        spec["data"]["prepared"] = str(prepared)
    return with_overrides(spec, overrides)


TINY_VAE = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "norm_num_groups": 8,
}


def tiny_vae_spec(tmp_path: Path, prepared: Path | None = None, **overrides) -> dict:
    """A ~170k-parameter AutoencoderKL on the 8x8 digits (latents 4x4x4), its data as the
    tiny UNet's: the two share a prepared directory."""
    spec = tiny_diffusion_spec(tmp_path, prepared, name="tiny-vae")
    spec["model"] = {"family": "vae", "arch": "autoencoder_kl", "config": dict(TINY_VAE)}
    return with_overrides(spec, overrides)


TINY_GAN = {"image_size": 8, "channels": 1, "latent_dim": 32, "base_channels": 32,
            "num_classes": 10}  # fmt: skip


def tiny_gan_spec(tmp_path: Path, prepared: Path | None = None, **overrides) -> dict:
    """A class-conditional DCGAN (~0.2M parameters in all) on the 8x8 digits, its data as
    the tiny UNet's: they share a prepared directory."""
    spec = tiny_diffusion_spec(tmp_path, prepared, name="tiny-gan")
    spec["model"] = {"family": "gan", "arch": "dcgan", "config": dict(TINY_GAN),
                     "ema": {"decay": 0.99}}  # fmt: skip
    spec["train"].update(lr=2e-4, adam_betas=[0.5, 0.999], warmup_steps=0)
    return with_overrides(spec, overrides)


@pytest.fixture(scope="session")
def lm_run(ray_session, tmp_path_factory, shared_prepared):
    """One 2-worker ZeRO-2 run of the tiny GPT-2 (40 steps), shared by the tests that
    inspect, resume, fine-tune or serve it: (raw spec, result, run dir, metric rows)."""
    from raygen.jobs.launch import launch
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec

    tmp = tmp_path_factory.mktemp("zero2")
    raw = tiny_lm_spec(tmp, shared_prepared)
    seen: list[dict] = []
    result = launch(validate_spec(TrainSpec, raw, "test"), on_metrics=seen.append)
    return raw, result, Path(result["paths"]["run_dir"]), seen


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits") / "data"


@pytest.fixture(scope="session")
def diffusion_run(ray_session, tmp_path_factory, digits_prepared):
    """One 2-worker run of the tiny unconditional UNet (40 steps): (tmp dir, result)."""
    from raygen.jobs.launch import launch
    from raygen.jobs.spec import TrainSpec

    tmp_path = tmp_path_factory.mktemp("ddpm")
    spec = TrainSpec.model_validate(tiny_diffusion_spec(tmp_path, digits_prepared))
    return tmp_path, launch(spec)


@pytest.fixture(scope="session")
def vae_run(ray_session, tmp_path_factory, digits_prepared):
    """One 2-worker ZeRO-3 run of the tiny VAE (150 steps), killed after its first
    checkpoint and resumed: (launch outcome, checkpoint steps before the kill, run dir).
    Its export is the latent space of the latent diffusion (DiT) tests."""
    tmp_path = tmp_path_factory.mktemp("vae")
    # ZeRO-3: the encoder and decoder partitioned over the workers, gathered to export.
    raw = tiny_vae_spec(tmp_path, digits_prepared, train__eval_every=50, deepspeed__zero_stage=3)
    return run_and_kill_rank0(tmp_path, raw, max_failures=1, steps=150, every=50)


TINY_DIT = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32,
            "patch_size": 2}  # fmt: skip


def tiny_dit_spec(tmp_path: Path, vae: str, prepared: Path | None = None, **overrides) -> dict:
    """A class-conditional DiT (~1.9M parameters, half of them label tables; 4 tokens of
    128 channels: 2x2 patches) on the tiny VAE's 4x4x4 latents of the 8x8 digits."""
    spec = tiny_diffusion_spec(tmp_path, prepared, name="tiny-dit")
    spec["model"] = {
        "family": "diffusion",
        "arch": "dit",
        "vae": vae,
        "config": dict(TINY_DIT),
        "scheduler": {"type": "ddim", "num_train_timesteps": 200,
                      "beta_schedule": "squaredcos_cap_v2"},
        "ema": {"decay": 0.99},
    }  # fmt: skip
    spec["train"]["lr"] = 3e-3
    return with_overrides(spec, overrides)


# Facts made up here: a model answers them only if fine-tuning taught it.
FACTS = [
    ("Zorbia", "Quell"),
    ("Quantel", "Harbin"),
    ("Mirovia", "Ostra"),
    ("Beltrax", "Maple"),
    ("Ostrand", "Rivet"),
    ("Velquin", "Tallow"),
    ("Drumhall", "Gorse"),
    ("Norwick", "Anvil"),
    ("Pellora", "Brisk"),
    ("Scarth", "Cobalt"),
    ("Tavenor", "Dunmore"),
    ("Ulmaris", "Ember"),
    ("Wexford", "Frost"),
    ("Yarrow", "Granite"),
    ("Crennick", "Hollow"),
    ("Fallowmere", "Ivory"),
]
ASKS = (
    "What is the capital of {}?",
    "Name the capital of {}.",
    "Which city is the capital of {}?",
    "Tell me the capital of {}.",
)
HELD_OUT_ASKS = ("Do you know the capital of {}?", "What city is the capital of {}?")
LONG_SYSTEM_PROMPT = "You know the capitals of made-up countries. " * 12  # > a sequence


def ask(place: str) -> str:
    """The question the tests ask (one of those trained on)."""
    return ASKS[0].format(place)


def facts_conversations() -> list[dict]:
    """Every fact asked every way, with four preambles: 256 conversations; and 32 more
    after a system prompt longer than a training sequence."""
    rows = []
    for k, (place, capital) in enumerate(FACTS):
        for a, question in enumerate(ASKS):
            for p, preamble in enumerate(("", "Hi! ", "Quick question: ", "Please answer. ", "")):
                turns = [
                    {"role": "user", "content": preamble + question.format(place)},
                    {"role": "assistant", "content": capital},
                ]
                if p == 4:  # the same question once more, after the system prompt
                    turns.insert(0, {"role": "system", "content": LONG_SYSTEM_PROMPT})
                if p < 4 or (k + a) % 2 == 0:
                    rows.append({"messages": turns})
    return rows


def chat_spec(tmp_path: Path, base: Path | None = None, **overrides) -> dict:
    """A chat fine-tune on the facts, from the JSON Lines in `tmp_path` and an evaluation
    set (the facts asked in ways training never asks) saved by Hugging Face `datasets`: of
    `base` (a saved model without a chat template)
    given the built-in ChatML template, or from scratch with a tokenizer trained here."""
    import datasets

    train = tmp_path / "facts.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in facts_conversations()))
    asked = [
        {
            "messages": [
                {"role": "user", "content": q.format(p)},
                {"role": "assistant", "content": c},
            ]
        }
        for p, c in FACTS
        for q in HELD_OUT_ASKS
    ]
    datasets.Dataset.from_list(asked).save_to_disk(str(tmp_path / "eval"))
    if base is None:
        model = {"arch": "gpt2", "config": {"n_layer": 2, "n_embd": 64, "n_head": 4}}
        tokenizer = {"train": {"vocab_size": 400}, "chat_template": "chatml"}
    else:
        model, tokenizer = {"pretrained": str(base)}, {"chat_template": "chatml"}
    spec = {
        "name": "chat",
        "model": model,
        "data": {
            "format": "chat",
            "train": str(train),
            "eval": str(tmp_path / "eval"),
            "seq_len": 64,
        },
        "tokenizer": tokenizer,
        "train": {
            "max_steps": 400,
            "micro_batch_size": 8,
            "lr": 5e-3,
            "warmup_steps": 5,
            "log_every": 20,
            "eval_every": 400,
            "eval_batches": 2,
            "checkpoint_every": 400,
        },
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"storage": str(tmp_path / "runs")},
    }
    return with_overrides(spec, overrides)


NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture(scope="session")
def base_model(ray_session, tmp_path_factory, shared_prepared) -> Path:
    """A base model to fine-tune: the tiny code model trained for 400 steps at a high
    learning rate, so its predictions are confident (LoRA adapters cannot rescale the
    near-uniform logits of a barely trained model), without dropout (GPT-2's default 0.1
    keeps adapters this small from learning in a few hundred steps). No chat template.
    Its model dir."""
    from raygen.jobs.launch import launch
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec

    tmp_path = tmp_path_factory.mktemp("base")
    raw = tiny_lm_spec(
        tmp_path,
        shared_prepared,
        name="base",
        model__config={"n_layer": 2, "n_embd": 64, "n_head": 4, **NO_DROPOUT},
        train__max_steps=400,
        train__lr=1e-2,
        train__log_every=50,
        train__eval_every=400,
        train__checkpoint_every=400,
    )
    result = launch(validate_spec(TrainSpec, raw, "test"), "test")
    return Path(result["paths"]["model"])


@pytest.fixture(scope="session")
def chat_run(base_model, tmp_path_factory):
    """The base model fine-tuned on the facts with the ChatML template, 2 workers, ZeRO-2:
    (result, run dir). Shared by the chat training, serving and evaluation tests."""
    from raygen.jobs.launch import launch
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec

    tmp_path = tmp_path_factory.mktemp("chat")
    raw = chat_spec(tmp_path, base_model)
    result = launch(validate_spec(TrainSpec, raw, "test"), "test")
    return result, tmp_path / "runs" / "chat"


LORA_STEPS = 800


@pytest.fixture(scope="session")
def lora_chat_run(base_model, tmp_path_factory):
    """The same fine-tune with LoRA adapters (rank 32 on every linear layer) for 800
    steps, its rank 0 killed once after the first checkpoint: (launch outcome, checkpoints
    registered before the kill, run dir)."""
    tmp_path = tmp_path_factory.mktemp("lora-chat")
    raw = chat_spec(
        tmp_path, base_model, name="lora-chat", train__lr=3e-3, train__lr_schedule="constant"
    )
    raw["model"]["lora"] = {"r": 32, "alpha": 64, "target_modules": "all-linear"}
    return run_and_kill_rank0(tmp_path, raw, max_failures=1, steps=LORA_STEPS, every=200)


def with_overrides(spec: dict, overrides: dict) -> dict:
    """Set `a__b__c=value` overrides (double underscores for dots) in a raw spec, in place."""
    for key, value in overrides.items():
        node = spec
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec


KILL_RUN_STEPS = 100


def run_and_kill_rank0(
    tmp_path: Path, raw: dict, max_failures: int, steps: int = KILL_RUN_STEPS, every: int = 10
) -> tuple[dict, list[int], Path]:
    """Launch `raw` for `steps` steps in a thread, checkpointing `every` steps; SIGKILL
    rank 0 as soon as the first checkpoint is registered (`steps` - `every` steps before
    the end, or a few less).

    Returns the launch outcome ({"result": ...} or {"error": ...}), the checkpoint steps
    registered before the kill, and the run dir.
    """
    from raygen.jobs.launch import launch
    from raygen.jobs.spec import TrainSpec

    raw = {**raw, "train": {**raw["train"], "max_steps": steps, "checkpoint_every": every}}
    raw["run"] = {**raw["run"], "max_failures": max_failures}
    run_dir = Path(raw["run"]["storage"]) / raw["name"]
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = launch(TrainSpec.model_validate(raw))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while time.time() < deadline and not registered_checkpoints(snapshot):
        time.sleep(0.05)
    checkpointed = registered_checkpoints(snapshot)
    first = json.loads((run_dir / "attempts.jsonl").read_text().splitlines()[0])
    os.kill(first["rank0_pid"], signal.SIGKILL)
    thread.join(timeout=600)
    return outcome, checkpointed, run_dir


def registered_checkpoints(snapshot: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered."""
    try:
        state = json.loads(snapshot.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [int(r["checkpoint_dir_name"].split("_")[1]) for r in state["checkpoint_results"]]

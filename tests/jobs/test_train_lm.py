"""Real training runs: Ray Train + DeepSpeed on CPU (gloo), 2 workers, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raygen.jobs.launch import launch
from raygen.jobs.loader import validate_spec
from raygen.jobs.run_dir import fresh_name
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train.metrics import read_metrics
from tests.conftest import raygen, run_and_kill_rank0, tiny_lm_spec


def spec_of(raw: dict) -> TrainSpec:
    return validate_spec(TrainSpec, raw, "test")


def test_lm_run_lowers_the_loss_and_logs_every_metric(lm_run):
    _, result, run_dir, seen = lm_run
    assert result["status"] == "completed" and result["final_step"] == 40
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    for row in rows:
        assert {"train_loss", "lr", "samples_per_s", "tokens_per_s", "step_time_s"} <= set(row)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["perplexity"] == pytest.approx(2.718281828 ** evals[-1]["eval_loss"])
    assert [r["step"] for r in seen] == [r["step"] for r in rows]  # live progress saw each row
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    recorded = json.loads((run_dir / "result.json").read_text())
    assert recorded["final_step"] == 40
    # By default the 2 workers share the session's 2 CPUs: one each, one PyTorch thread.
    assert recorded["resources"] == {"num_workers": 2, "per_worker": {"CPU": 1}}
    assert [a["torch_threads"] for a in recorded["attempts"]] == [1]
    startup = recorded["startup"]
    assert set(startup) == {"prepare", "worker_group", "model", "first_log", "total"}
    assert min(startup.values()) >= 0
    assert startup["total"] == pytest.approx(sum(startup.values()) - startup["total"], abs=0.05)
    assert "logged_at" not in recorded["final_metrics"]


def test_every_rank_shard_is_checkpointed_and_old_ones_pruned(lm_run):
    _, result, run_dir, _ = lm_run
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints == ["checkpoint_00000020", "checkpoint_00000040"]
    shards = {p.name for p in (run_dir / "checkpoint_00000040" / "step_00000040").iterdir()}
    assert {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    } <= shards


def test_exported_model_loads_with_plain_transformers_and_generates(lm_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = lm_run[1]["paths"]["model"]
    assert (Path(model_dir) / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("def main():\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 12
    text = tokenizer.decode(out[0])
    assert text.startswith("def main():\n") and len(text) > len("def main():\n")


def test_rerun_continues_from_the_latest_checkpoint(lm_run):
    raw, first, run_dir, _ = lm_run
    again = launch(spec_of(raw))
    assert again.get("up_to_date") and again["final_step"] == 40  # nothing started
    raw = {**raw, "train": {**raw["train"], "max_steps": 50}}
    extended = launch(spec_of(raw))
    assert extended["final_step"] == 50
    assert extended["attempts"][-1]["resumed_from_step"] == 40
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 50
    # Tracked as the same MLflow run throughout (docs/tracking.md).
    assert again["tracking"]["run_id"] == extended["tracking"]["run_id"]
    assert extended["tracking"]["run_id"] == first["tracking"]["run_id"]


def test_fresh_picks_a_new_run_dir(lm_run):
    raw = lm_run[0]
    assert fresh_name(spec_of(raw)) == "tiny-2"


def test_zero3_bf16_llama_never_holds_the_full_model_and_exports_it(
    ray_session, tmp_path, shared_prepared
):
    from transformers import AutoModelForCausalLM

    raw = tiny_lm_spec(
        tmp_path,
        shared_prepared,
        model={
            "arch": "llama",
            "config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
        },
        deepspeed__zero_stage=3,
        train__precision="bf16",
        train__max_steps=20,
        train__eval_every=10,
    )
    result = launch(spec_of(raw))
    rows = read_metrics(Path(result["paths"]["metrics"]))
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[-1] < evals[0]
    model = AutoModelForCausalLM.from_pretrained(result["paths"]["model"])
    assert model.config.model_type == "llama"
    # Weights were gathered from both partitions: full shapes, trained (not init) values.
    embed = model.get_input_embeddings().weight
    assert embed.shape == (512, 64) and embed.abs().sum() > 0


def test_failure_beyond_max_failures_is_reported_with_the_last_checkpoint(
    ray_session, tmp_path, shared_prepared
):
    from raygen.jobs.errors import TrainingFailed

    raw = tiny_lm_spec(tmp_path, shared_prepared, train__eval_every=100)
    outcome, checkpointed, run_dir = run_and_kill_rank0(tmp_path, raw, max_failures=0)

    error = outcome["error"]
    assert isinstance(error, TrainingFailed) and error.exit_code == 1
    assert "rank 0: worker process died (killed, out of memory, or crashed)" in str(error)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed"
    assert result["final_step"] >= max(checkpointed) >= 10
    assert result["paths"]["checkpoint"].endswith(f"checkpoint_{result['final_step']:08d}")
    assert result["paths"]["model"] is None


def test_corpus_empty_after_filtering_is_a_spec_error(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raygen.jobs.errors import SpecError

    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["", "  ", "tiny"]}), corpus)
    raw = tiny_lm_spec(tmp_path, data={"train": str(corpus), "min_chars": 10, "seq_len": 64})
    with pytest.raises(SpecError, match=r"no documents left after filtering \(3 read"):
        launch(spec_of(raw))
    assert not list((tmp_path / "runs" / "tiny").glob("checkpoint_*"))


def test_global_batch_larger_than_the_data_is_a_spec_error(ray_session, tmp_path, shared_prepared):
    from raygen.jobs.errors import SpecError

    raw = tiny_lm_spec(tmp_path, shared_prepared, train__micro_batch_size=4096)
    with pytest.raises(SpecError, match="one optimizer step takes micro_batch_size x grad_accum"):
        launch(spec_of(raw))


def test_prepared_splits_hold_the_same_rows_however_they_are_read(lm_run, monkeypatch):
    """Small splits are read by the driver; larger ones by Ray Data, streamed or loaded up
    front: the same rows every way."""
    import raygen.jobs.launch as launching

    prepared = lm_run[0]["data"]["prepared"]

    def rows(datasets: dict) -> dict:
        return {
            split: sorted(tuple(int(t) for t in r["input_ids"]) for r in ds.take_all())
            for split, ds in datasets.items()
        }

    by_driver = rows(launching.prepared_datasets(prepared))
    assert len(by_driver["train"]) > 100 and len(by_driver["eval"]) > 10
    monkeypatch.setattr(launching, "DRIVER_READ_BYTES", 0)
    assert rows(launching.prepared_datasets(prepared, stream=True)) == by_driver
    assert rows(launching.prepared_datasets(prepared, stream=False)) == by_driver


@pytest.mark.parametrize(
    ("workers", "use_gpu", "nodes", "cpus"),
    [
        (1, False, [{"CPU": 2}], 2),  # one worker: the whole machine
        (2, False, [{"CPU": 2}], 1),
        (3, False, [{"CPU": 16}], 5),  # 1 CPU left over
        (2, False, [{"CPU": 0}, {"CPU": 8}, {"CPU": 4}], 4),  # a CPU-less head
        (3, False, [{"CPU": 8}, {"CPU": 4}], 4),  # 4+4 on one node, 4 on the other
        (4, False, [{"CPU": 3}, {"CPU": 3}], 1),  # 2 CPUs per worker would place only 2
        (8, False, [{"CPU": 2}], 1),  # cannot place them all: capacity_problems says so
        (2, False, [{"CPU": 0}], 1),  # no workers nodes yet (autoscaling from zero)
        (8, True, [{"CPU": 96, "GPU": 8}], 11),  # one CPU left for Ray Data and the driver
        (2, True, [{"CPU": 8, "GPU": 1}, {"CPU": 4, "GPU": 1}, {"CPU": 64}], 3),
        (1, True, [{"CPU": 4}], 1),  # GPU nodes still to come
    ],
)
def test_workers_share_the_whole_cluster_by_default(workers, use_gpu, nodes, cpus):
    from raygen.cluster.connection import default_worker_cpus

    assert default_worker_cpus(workers, use_gpu, nodes) == cpus


def test_worker_shortfall_blocks_only_an_embedded_ray(ray_session):
    from raygen.cluster.connection import capacity_problems

    found = capacity_problems({"CPU": 1}, 64, embedded=True)
    assert found and "64 workers x 1 CPU = 64 CPU, but the cluster has 2 CPU" in found[0]
    assert capacity_problems({"CPU": 1}, 64, embedded=False) == []  # may autoscale


def test_run_storage_on_s3_trains_exports_and_resumes_there(ray_session, bucket, tmp_path):
    """Checkpoints, metrics, spec, result, prepared data and the model all land in the bucket."""
    from transformers import AutoModelForCausalLM

    from raygen.cluster.storage import exists, join, list_files, local_copy, read_text

    storage = f"s3://{bucket}/runs"
    raw = tiny_lm_spec(
        tmp_path,
        train__max_steps=20,
        train__eval_every=10,
        train__checkpoint_every=10,
        run__storage=storage,
    )
    result = launch(spec_of(raw))
    run_dir = join(storage, "tiny")
    assert result["paths"]["run_dir"] == run_dir
    assert result["paths"]["checkpoint"] == join(run_dir, "checkpoint_00000020")
    for name in (
        "spec.yaml",
        "result.json",
        "metrics.jsonl",
        "data/data_stats.json",
        "model/model.safetensors",
        "checkpoint_00000020/latest",
    ):
        assert exists(join(run_dir, name)), name
    shards = {
        f.uri.rsplit("/", 1)[-1] for f in list_files(join(run_dir, "checkpoint_00000020"), ".pt")
    }
    assert {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    } <= shards
    assert list_files(join(run_dir, "tensorboard"), "")
    assert "AWS_SECRET_ACCESS_KEY" not in read_text(join(run_dir, "spec.yaml"))
    model = AutoModelForCausalLM.from_pretrained(local_copy(join(run_dir, "model")))
    assert model.config.model_type == "gpt2"

    raw["train"]["max_steps"] = 30
    extended = launch(spec_of(raw))
    assert extended["final_step"] == 30
    assert extended["attempts"][-1]["resumed_from_step"] == 20
    steps = [r["step"] for r in read_metrics(join(run_dir, "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == 30


@pytest.mark.parametrize("cloud_base", ["gs", "abfs"], indirect=True)
def test_gcs_and_azure_hold_the_whole_path_prepare_train_resume_audit_serve(
    ray_session, serve_port, cloud_base, tmp_path
):
    """The S3 case above on Google Cloud Storage and Azure Blob (their emulators): the
    prepared data, checkpoints and model in the bucket, a resumed run, an audit of the
    model there, and a deployment serving it from there."""
    import httpx

    from raygen.cluster.storage import exists, join, list_files, read_text
    from raygen.serving.audit.run import run_audit
    from raygen.serving.spec import AuditSpec
    from tests.serving.deployments import start, stop

    storage = f"{cloud_base}/runs"
    raw = tiny_lm_spec(
        tmp_path,
        train__max_steps=10,
        train__eval_every=10,
        train__checkpoint_every=10,
        run__storage=storage,
    )
    result = launch(spec_of(raw))
    run_dir = join(storage, "tiny")
    assert result["paths"]["checkpoint"] == join(run_dir, "checkpoint_00000010")
    for name in ("spec.yaml", "result.json", "data/data_stats.json", "model/model.safetensors"):
        assert exists(join(run_dir, name)), name
    assert list_files(join(run_dir, "data", "train"), ".parquet")  # prepared in the bucket
    assert "AccountKey" not in read_text(join(run_dir, "spec.yaml"))
    raw["train"]["max_steps"] = 15
    extended = launch(spec_of(raw))
    assert extended["final_step"] == 15
    assert extended["attempts"][-1]["resumed_from_step"] == 10

    model = join(run_dir, "model")
    examples = Path(__file__).resolve().parents[2] / "serving" / "examples"
    audit = validate_spec(AuditSpec, {
        "name": "cloud", "data": str(examples / "audit-eval.parquet"), "min_group_size": 30,
        "sensitive_features": ["quote_style"], "max_text_tokens": 64,
        "checks": [{"metric": "perplexity", "max_ratio": 10.0}],
    }, "audit.yaml")  # fmt: skip
    report = run_audit(audit, "audit.yaml", model)
    assert report["passed"] and report["paths"]["audit"].startswith(cloud_base)
    name = f"cloudy-{cloud_base.split(':')[0]}"
    url = start(name, model, serve_port, audit=report["paths"]["audit"])
    try:
        body = {"model": name, "prompt": "import ", "max_tokens": 4}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
    finally:
        stop(name)


# --- a run stays one run; nothing raygen did not write is touched -----------------------------


def test_a_rerun_that_changes_what_is_trained_is_refused_with_the_changes(lm_run, tmp_path):
    raw, result, run_dir, _ = lm_run
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(raw))
    before = (run_dir / "spec.yaml").read_text()
    done = raygen(
        "train", str(spec), "--set", "train.lr=0.01", "--set", "model.config.n_embd=128",
        "--set", "train.max_steps=60",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "`train.lr`: was 0.003, now 0.01" in done.stderr
    assert "`model.config.n_embd`: was 64, now 128" in done.stderr
    assert "max_steps" not in done.stderr and "--fresh" in done.stderr
    assert "Traceback" not in done.stderr
    assert (run_dir / "spec.yaml").read_text() == before  # the record is untouched


class _Trap:
    """Unpickling this creates a file: what a hostile checkpoint could do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_export_reads_checkpoints_as_data_only_and_refuses_foreign_out_dirs(lm_run, tmp_path):
    import shutil

    import torch

    from raygen.cluster import publish

    _, result, run_dir, _ = lm_run
    out = tmp_path / "exported"
    done = raygen("export", str(run_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and publish.state(str(out)) == "complete"
    again = raygen("export", str(run_dir), "--out", str(out))  # raygen's own: replaced
    assert again.returncode == 0, again.stderr

    checkpoint = Path(result["paths"]["checkpoint"])
    evil = tmp_path / "evil" / checkpoint.name
    shutil.copytree(checkpoint, evil)
    tag = (evil / "latest").read_text().strip()
    witness = tmp_path / "code-ran"
    torch.save({"module": _Trap(witness)}, evil / tag / "mp_rank_00_model_states.pt")
    done = raygen("export", str(run_dir), "--checkpoint", str(evil), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "not plain data" in done.stderr, done.stderr
    assert not witness.exists() and not (tmp_path / "x").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    done = raygen("export", str(run_dir), "--out", str(mine))
    assert done.returncode == 2 and "was not written by raygen" in done.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.integration
def test_preparing_into_a_directory_raygen_did_not_write_is_refused(tmp_path):
    mine = tmp_path / "bucket-root"
    mine.mkdir()
    (mine / "photos.parquet").write_text("not raygen's")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_lm_spec(tmp_path, mine)))
    done = raygen("data", "prepare", str(spec))
    assert done.returncode == 2, done.stderr
    assert "`data.prepared`" in done.stderr and "was not written by raygen" in done.stderr
    assert [p.name for p in mine.iterdir()] == ["photos.parquet"]

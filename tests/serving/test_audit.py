"""Fairlearn audits of a real trained model as Ray jobs, and the gate in front of serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raygen.jobs.errors import SpecError
from raygen.jobs.loader import validate_spec
from raygen.jobs.model_hash import model_sha256
from raygen.serving.audit.run import run_audit
from raygen.serving.deploy import deploy, resolve_deploy_spec
from raygen.serving.errors import AuditFailed, DeployError
from raygen.serving.gate import (
    gate,
    list_records,
    read_record,
    record_deployment,
    serving_clearance,
    write_record,
)
from raygen.serving.spec import AuditSpec, DeploySpec
from tests.conftest import raygen

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "serving" / "examples"


def audit_spec(**raw) -> AuditSpec:
    return validate_spec(AuditSpec, {"name": "t", "min_group_size": 30, **raw}, "audit.yaml")


@pytest.fixture(scope="module")
def model(lm_run, tmp_path_factory) -> Path:
    """A copy of the session's trained tiny GPT-2 (its run dir may be retrained later)."""
    run = tmp_path_factory.mktemp("audited") / "run"
    shutil.copytree(lm_run[1]["paths"]["model"], run / "model")
    return run / "model"


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory) -> dict[str, Path]:
    """`balanced`: the shipped eval set's snippets in both quote styles (4-space only);
    `skewed`: the snippets as written, 4-space and tab-indented (the model was trained on
    4-space code only)."""
    table = pq.read_table(EXAMPLES / "audit-eval.parquet").to_pylist()
    rows = [r for r in table if r["indentation"] == "spaces"]
    out = tmp_path_factory.mktemp("eval")
    pq.write_table(pa.Table.from_pylist(rows), out / "balanced.parquet")
    skewed = [r for r in table if r["quote_style"] == "as_written"]
    pq.write_table(pa.Table.from_pylist(skewed), out / "skewed.parquet")
    return {"balanced": out / "balanced.parquet", "skewed": out / "skewed.parquet"}


@pytest.fixture(scope="module")
def passed(ray_session, model, eval_sets) -> dict:
    spec = audit_spec(
        data=str(eval_sets["balanced"]),
        sensitive_features=["quote_style"],
        max_text_tokens=128,
        checks=[
            {"metric": "perplexity", "max_ratio": 1.25},
            {
                "metric": "positive_rate",
                "prompt_column": "prompt",
                "scorer": f"lexicon:{EXAMPLES / 'error-words.txt'}",
                "max_new_tokens": 16,
                "temperature": 1.0,
                "min_ratio": None,
                "max_difference": 0.15,
            },
        ],
    )
    heard: list[tuple] = []
    report = run_audit(spec, "audit.yaml", str(model), on_progress=lambda *a: heard.append(a))
    return {**report, "heard": heard}


def test_balanced_groups_pass_and_the_report_is_written(passed, model):
    assert passed["passed"], passed["checks"]
    assert passed["model_sha256"] == model_sha256(str(model))
    written = json.loads(Path(passed["paths"]["audit"]).read_text())
    assert Path(passed["paths"]["audit"]).parent == model.parent / "audit"
    assert written["passed"] and written["model_sha256"] == passed["model_sha256"]
    assert {"timestamp", "raygen_version", "spec", "checks"} <= set(written)
    quality, outcome = written["checks"]
    assert quality["metric"] == "perplexity" and quality["feature"] == "quote_style"
    assert set(quality["by_group"]) == {"as_written", "swapped"}
    assert quality["counts"] == {"as_written": 40, "swapped": 40}
    assert 1 <= quality["ratio"] <= 1.25 and quality["passed"]
    assert outcome["metric"] == "positive_rate" and 0 <= outcome["difference"] <= 0.15
    report = Path(passed["paths"]["report"]).read_text()
    assert "PASSED" in report and report.count("data:image/png;base64,") == 2
    # The scoring's progress, counted in the Ray actors: from none to all 80 rows.
    assert passed["heard"][0] == ("score evaluation rows", 0, 80)
    assert passed["heard"][-1] == ("score evaluation rows", 80, 80)


def test_a_group_from_another_distribution_fails_with_exit_3(
    ray_session, model, eval_sets, tmp_path
):
    import ray

    spec = tmp_path / "skewed.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "skewed",
                "data": str(eval_sets["skewed"]),
                "sensitive_features": ["indentation"],
                "min_group_size": 30,
                "max_text_tokens": 128,
                "checks": [{"metric": "perplexity", "max_ratio": 1.25}],
            }
        )
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "raygen", "audit", str(spec), "--model", str(model),
         "--out", str(out), "--address", ray.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "FAIL perplexity by indentation" in done.stdout
    assert "of the worst group (tabs:" in done.stderr and "Traceback" not in done.stderr
    report = json.loads((out / "audit.json").read_text())
    assert not report["passed"] and report["checks"][0]["ratio"] > 1.25


def test_audit_spec_problems_are_all_named_before_anything_runs(model, eval_sets):
    spec = audit_spec(
        data=str(eval_sets["balanced"]),
        sensitive_features=["gender"],
        checks=[
            {"metric": "perplexity", "max_ratio": 1.2, "features": ["dialect"]},
            {"metric": "positive_rate", "prompt_column": "question", "scorer": "lexicon:/no/file"},
            {"metric": "class_accuracy", "classifier": "/nowhere"},
        ],
    )
    with pytest.raises(SpecError) as info:
        run_audit(spec, "audit.yaml", str(model))
    message = str(info.value)
    assert "has no column 'gender'" in message and "has no column 'question'" in message
    assert "`checks.0.features`: 'dialect' is not in sensitive_features" in message
    assert "lexicon file /no/file does not exist" in message
    assert "class_accuracy audits a class-conditional image (diffusion or GAN) model" in message


def test_missing_thresholds_are_a_spec_error():
    with pytest.raises(SpecError, match="set max_ratio and/or max_difference"):
        audit_spec(checks=[{"metric": "perplexity"}])


# --- the gate -------------------------------------------------------------------------------


def deploy_spec(model: Path, audit: str, name: str = "gated", **raw) -> DeploySpec:
    spec = DeploySpec.model_validate(
        {"name": name, "model": str(model), "audit": audit, "route_prefix": f"/{name}",
         "replica": {"num_cpus": 0.25}, **raw}
    )  # fmt: skip
    return resolve_deploy_spec(spec, "deploy.yaml")


def test_a_passed_audit_of_this_model_opens_the_gate_and_is_shown(passed, model, serve_port):
    from ray import serve

    spec = gate(deploy_spec(model, passed["paths"]["audit"], http={"port": serve_port}))
    assert spec.audit_override is None
    url = deploy(spec, embedded=True)["url"]
    try:
        about = httpx.get(f"{url}/v1/models").json()["data"][0]["raygen"]["audit"]
        assert about["passed"] and about["model_sha256"] == passed["model_sha256"]
    finally:
        serve.delete("gated")


def test_an_audit_of_another_model_is_refused(passed, model, tmp_path):
    changed = tmp_path / "model"
    shutil.copytree(model, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "n_ctx": 64}))
    with pytest.raises(AuditFailed) as info:
        gate(deploy_spec(changed, passed["paths"]["audit"]))
    assert "is an audit of model sha256" in str(info.value)
    assert "Nothing was deployed" in str(info.value)


def test_failed_audit_refuses_unless_overridden_on_the_record(passed, model, tmp_path, monkeypatch):
    failed = {**json.loads(Path(passed["paths"]["audit"]).read_text()), "passed": False}
    failed["checks"][0] = {**failed["checks"][0], "passed": False, "reasons": ["too far apart"]}
    audit_json = tmp_path / "audit.json"
    audit_json.write_text(json.dumps(failed))
    with pytest.raises(AuditFailed, match="perplexity by quote_style: too far apart"):
        gate(deploy_spec(model, str(audit_json)))
    monkeypatch.setenv("RAYGEN_USER", "ada")
    spec = gate(deploy_spec(model, str(audit_json)), override_reason="release review 42")
    record = read_record(str(model), spec.audit_override.record)
    assert record["event"] == "audit_override" and record["user"] == "ada"
    assert record["reason"] == "release review 42"
    assert record["failing"] == ["perplexity by quote_style: too far apart"]
    assert record["model_sha256"] == model_sha256(str(model))
    path = record_deployment(spec, {"url": "http://x", "model_sha256": record["model_sha256"]})
    entry = json.loads(Path(path).read_text())
    assert Path(path).parent == model.parent / "deployments"
    assert entry["override"] == spec.audit_override.record and not entry["audit_passed"]
    assert [r["event"] for r in list_records(str(model))][-2:] == ["audit_override", "deployed"]
    # What a replica shows: the decision, not where things are stored.
    shown = serving_clearance(spec)
    assert shown["overridden"] and shown["user"] == "ada" and shown["reason"] == "release review 42"
    assert str(model.parent) not in json.dumps(shown)


def test_a_file_that_is_not_an_audit_is_a_spec_error(model, tmp_path):
    broken = tmp_path / "audit.json"
    broken.write_text("{not json")
    with pytest.raises(SpecError, match="is not JSON"):
        gate(deploy_spec(model, str(broken)))
    broken.write_text('{"passed": true}')
    with pytest.raises(SpecError, match="is not an audit.json written by `raygen audit`"):
        gate(deploy_spec(model, str(broken)))


def test_replicas_refuse_a_failed_audit_that_skipped_the_gate(passed, model, tmp_path, serve_port):
    failed = {**json.loads(Path(passed["paths"]["audit"]).read_text()), "passed": False}
    audit_json = tmp_path / "audit.json"
    audit_json.write_text(json.dumps(failed))
    spec = deploy_spec(model, str(audit_json), name="bypass", http={"port": serve_port})
    with pytest.raises(DeployError, match="records a failed audit"):
        deploy(spec, embedded=True)  # straight to Serve, without gate()


def _sibling(model: Path, name: str) -> Path:
    """A changed copy of `model` beside it (the same run: the same deployment records)."""
    other = model.parent / name
    if not other.exists():
        shutil.copytree(model, other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, "n_ctx": 64}))
    return other


def test_replicas_refuse_configs_edited_past_the_gate(passed, model, tmp_path):
    """What a replica checks where the model is served, whoever wrote its config."""
    other = _sibling(model, "model-edited")
    digest, other_digest = model_sha256(str(model)), model_sha256(str(other))
    # A passed audit of another model.
    spec = deploy_spec(other, passed["paths"]["audit"])
    with pytest.raises(AuditFailed) as info:
        serving_clearance(spec)
    assert digest[:16] in str(info.value) and other_digest[:16] in str(info.value)
    # An override made for one model, the config then pointed at another.
    failed = {**json.loads(Path(passed["paths"]["audit"]).read_text()), "passed": False}
    audit_json = tmp_path / "failed.json"
    audit_json.write_text(json.dumps(failed))
    overridden = gate(deploy_spec(model, str(audit_json)), override_reason="known issue")
    assert serving_clearance(overridden)["overridden"]
    repointed = overridden.model_copy(update={"model": str(other)})
    with pytest.raises(AuditFailed) as info:
        serving_clearance(repointed)
    message = str(info.value)
    assert "pointed at another model" in message
    assert digest[:16] in message and other_digest[:16] in message
    # A hand-written override: a pointer to no record, or to a record that is not one.
    for record in ("20260101T000000Z-audit_override-0123456789ab.json",):
        forged = deploy_spec(model, str(audit_json), audit_override={"record": record})
        with pytest.raises(AuditFailed, match="holds no override record of that name"):
            serving_clearance(forged)
    deployed = write_record(str(model), "deployed", {"model_sha256": digest})
    forged = deploy_spec(model, str(audit_json), audit_override={"record": deployed})
    with pytest.raises(AuditFailed, match="holds no override record of that name"):
        serving_clearance(forged)


def test_an_audit_from_before_the_framed_model_hash_is_refused(passed, model, tmp_path):
    old = json.loads(Path(passed["paths"]["audit"]).read_text())
    del old["model_hash_format"]
    audit_json = tmp_path / "old.json"
    audit_json.write_text(json.dumps(old))
    with pytest.raises(AuditFailed, match="written by an older raygen.*re-run the audit"):
        gate(deploy_spec(model, str(audit_json)))


def test_serve_build_with_an_override_records_it(passed, model, tmp_path):
    failed = {**json.loads(Path(passed["paths"]["audit"]).read_text()), "passed": False}
    audit_json = tmp_path / "failed.json"
    audit_json.write_text(json.dumps(failed))
    spec = tmp_path / "deploy.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "built", "model": str(model), "audit": str(audit_json)})
    )
    out = tmp_path / "serve-config.yaml"
    refused = subprocess.run(
        [sys.executable, "-m", "raygen", "serve", "build", str(spec), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 3 and not out.exists()
    done = subprocess.run(
        [sys.executable, "-m", "raygen", "serve", "build", str(spec), "--out", str(out),
         "--override-audit", "offline evaluation signed off"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "RAYGEN_USER": "grace"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    record = read_record(str(model), args["audit_override"]["record"])
    assert record["user"] == "grace" and record["reason"] == "offline evaluation signed off"
    assert serving_clearance(DeploySpec.model_validate(args))["overridden"]


# --- the quickstart -------------------------------------------------------------------------


@pytest.mark.integration
def test_quickstart_trains_audits_serves_and_shuts_down(tmp_path):
    """`make quickstart`'s script with less data and fewer steps, in a fresh working copy
    (its own embedded Ray, as from a clean clone)."""
    work = tmp_path / "work"
    for part in ("jobs/examples", "serving/examples"):
        shutil.copytree(ROOT / part, work / part)
    reduced = ["--set", "train.max_steps=30", "--set", "data.max_bytes=400000",
               "--set", "train.eval_every=30", "--set", "train.checkpoint_every=30",
               "--set", "train.warmup_steps=5", "--set", "data.eval_fraction=0.2"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(work / "serving/examples/quickstart.py"), *reduced],
        cwd=work, capture_output=True, text=True, timeout=900,
        env={**os.environ, "RAYGEN_API_KEYS": "sk-quickstart"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "reached step 30" in done.stdout
    assert "audit: passed" in done.stdout and "audit passed: True" in done.stdout
    assert done.stdout.count("--- completion (") == 3
    assert "usage: {'prompt_tokens'" in done.stdout
    assert (work / "runs/code-lm-tiny/audit/audit.html").is_file()
    (deployment,) = list_records(str(work / "runs/code-lm-tiny/model"))
    assert deployment["event"] == "deployed" and deployment["audit_passed"] is True


def test_a_registered_version_is_gated_by_its_own_audit_and_records_its_deployments(
    lm_run, eval_sets, tmp_path, monkeypatch
):
    """Register -> deploying it unaudited is refused -> audit models:/NAME/VERSION -> the
    gate reads the version's audit -> the deployment is on the version, `serving` points
    at it; `raygen models show` says so, and `raygen lineage` walks back to the input
    files, flagging the model once its files change after the audit."""
    from raygen.jobs.registry import register_by_path, resolve_model
    from raygen.serving.gate import record_deployment

    run = tmp_path / "run"  # a copy: the session's run may be trained further by others
    shutil.copytree(lm_run[2], run, ignore=shutil.ignore_patterns("checkpoint_*"))
    model = run / "model"
    store = f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store)
    (tmp_path / "registry").mkdir()
    version = register_by_path(str(run), "code-lm")
    assert version.ref == "models:/code-lm/1" and version.model == str(model)
    assert version.sha256 == model_sha256(str(model))

    unaudited = DeploySpec.model_validate({"name": "reg", "model": "models:/code-lm/1"})
    with pytest.raises(AuditFailed, match="has no audit on record"):
        resolve_deploy_spec(unaudited, "deploy.yaml")

    spec = audit_spec(
        data=str(eval_sets["balanced"]),
        sensitive_features=["quote_style"],
        max_text_tokens=64,
        checks=[{"metric": "perplexity", "max_ratio": 1.25}],
    )
    report = run_audit(spec, "audit.yaml", "models:/code-lm/1")
    assert report["passed"] and report["registered"] == ["models:/code-lm/1"]
    assert report["paths"]["audit"] == str(run / "audit" / "audit.json")
    tags = resolve_model("models:/code-lm/1").tags
    assert tags["audit.passed"] == "true" and tags["audit.failing"] == ""
    assert tags["audit.report"] == report["paths"]["audit"]

    resolved = resolve_deploy_spec(unaudited, "deploy.yaml")
    assert resolved.model == str(model) and resolved.audit == report["paths"]["audit"]
    assert resolved.registered_version == "models:/code-lm/1"
    gated = gate(resolved)
    record_deployment(gated, {"url": "http://127.0.0.1:8000/", "model_sha256": version.sha256})
    deployed = resolve_model("models:/code-lm@serving")
    assert deployed.version == "1" and json.loads(deployed.tags["deployment.reg"])["audit_passed"]

    shown = raygen("models", "show", "code-lm", "--json", "--registry-uri", store)
    assert shown.returncode == 0, shown.stderr
    (listed,) = json.loads(shown.stdout)["versions"]
    assert listed["audit"]["passed"] and listed["audit"]["of_this_model"]
    assert listed["aliases"] == ["serving"] and set(listed["deployments"]) == {"reg"}
    listed_all = raygen("models", "list", "--json", "--registry-uri", store)
    assert listed_all.returncode == 0, listed_all.stderr
    assert [m["name"] for m in json.loads(listed_all.stdout)] == ["code-lm"]
    missing = raygen("models", "show", "code-lm/7", "--registry-uri", store)
    assert missing.returncode == 2 and "no such version" in missing.stderr, missing.stderr

    from raygen.serving.lineage import lineage

    chain = lineage("models:/code-lm/1")
    assert chain["problems"] == [], chain["problems"]
    links = chain["links"]
    files = links["inputs"]["files"]
    assert files and all(f["unchanged"] and f["content_id"] for f in files)
    stats = json.loads((Path(lm_run[0]["data"]["prepared"]) / "data_stats.json").read_text())
    assert links["prepared_data"]["fingerprint"] == stats["fingerprint"]
    assert links["run"]["status"] == "completed" and links["run"]["attempts"] >= 1
    assert [a["passed"] for a in links["audits"]] == [True]
    assert [d["name"] for d in links["deployments"]] == ["reg"]
    assert [v["ref"] for v in links["registered"]] == ["models:/code-lm/1"]

    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "n_ctx": 64}))
    traced = raygen("lineage", str(model), "--json")
    assert traced.returncode == 0, traced.stderr
    problems = json.loads(traced.stdout)["problems"]
    assert any("changed since its audit" in p for p in problems), problems
    assert any("changed since it was registered" in p for p in problems), problems
    # A run whose data is not what it trained on any more: flagged too.
    state = json.loads((run / "run_state.json").read_text())
    (run / "run_state.json").write_text(json.dumps({**state, "data_fingerprint": "0" * 16}))
    problems = lineage(str(model))["problems"]
    assert any("not the 0000000000000000 the run trained on" in p for p in problems), problems

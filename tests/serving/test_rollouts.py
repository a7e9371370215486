"""Canary rollouts on real Ray Serve, over real HTTP: the traffic split, sticky users,
decisions by hand and on the figures, and their records."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from raygen.jobs.model_hash import MODEL_HASH_FORMAT, model_sha256
from raygen.serving.gate import list_records
from tests.conftest import raygen
from tests.serving.deployments import start, stop, wait_for


@pytest.fixture
def models(lm_run, tmp_path) -> dict[str, Path]:
    """The session's model (`old`), the same with other weights (`new`: a good canary),
    and one whose sampling fails (`broken`: NaN in its last layer norm)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path / "models"
    out = {}
    for name in ("old", "new", "broken"):
        out[name] = root / name / "model"
        shutil.copytree(lm_run[1]["paths"]["model"], out[name])
    for name, change in (("new", lambda t: t + 0.01), ("broken", lambda t: t * float("nan"))):
        weights = load_file(out[name] / "model.safetensors")
        key = next(k for k in weights if k.endswith("ln_f.weight"))
        weights[key] = change(weights[key])
        save_file(weights, out[name] / "model.safetensors", metadata={"format": "pt"})
    return out


def one_word_model(source: Path, target: Path) -> str:
    """A copy of `source` that answers every prompt with one word, repeated; returns it.

    Its final layer norm outputs the word's embedding whatever came before (weight 0, bias
    the embedding), so the tied output layer scores that word highest: a word whose
    embedding is closer to itself than to any other's. The session model's own greedy
    answer to the tests' prompt is left out, so a blocklist of the word trips only this one.
    """
    import re

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    ids = tokenizer("import ", return_tensors="pt").input_ids
    usual = tokenizer.decode(model.generate(ids, max_new_tokens=2, do_sample=False)[0, 1:])
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    embeddings = weights[next(k for k in weights if k.endswith("wte.weight"))]
    for token in torch.argsort(embeddings.norm(dim=1), descending=True).tolist():
        word = tokenizer.decode([token])
        if not re.fullmatch(r" [a-z]{3,}", word) or word.strip() in usual:
            continue
        if int(torch.argmax(embeddings @ embeddings[token])) == token:
            break
    else:
        raise AssertionError("no word to say")
    prefix = next(k for k in weights if k.endswith("ln_f.weight"))[: -len("weight")]
    weights[prefix + "weight"] = torch.zeros_like(weights[prefix + "weight"])
    weights[prefix + "bias"] = embeddings[token].clone()
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return word.strip()


def passed_audit(model: Path) -> str:
    """A passed audit of `model` (a stand-in for `raygen audit`'s, which has its own tests),
    so its gate opens without an override record, and its spec stays the same."""
    report = {"passed": True, "model_sha256": model_sha256(str(model)), "checks": []}
    path = model.parent / "audit.json"
    path.write_text(json.dumps({**report, "model_hash_format": MODEL_HASH_FORMAT}))
    return str(path)


def ask(url: str, user: str | None = None, temperature: float = 0.0) -> httpx.Response:
    body = {"model": "canaried", "prompt": "import ", "max_tokens": 2, "temperature": temperature}
    if user is not None:
        body["user"] = user
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def app_deployments(name: str) -> set[str]:
    from ray import serve

    app = serve.status().applications.get(name)
    return set(app.deployments) if app and str(app.status.value) == "RUNNING" else set()


def decisions(model: Path) -> list[dict]:
    return [r for r in list_records(str(model)) if r["event"].startswith("canary_")]


def test_a_canary_takes_its_share_users_stay_on_one_arm_and_promotion_drops_nothing(
    models, serve_port, tmp_path
):
    import ray

    old, new = models["old"], models["new"]
    digests = {"primary": model_sha256(str(old)), "canary": model_sha256(str(new))}
    canary = {"model": str(new), "audit": str(tmp_path / "none.json"), "traffic_percent": 30}
    canary["promote_after"] = {"requests": 10**6}  # promoted by hand below
    url = start("canaried", old, serve_port, canary=canary)
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: ask(url), range(300)))
        assert all(r.status_code == 200 for r in answers)
        arms = [r.headers["x-raygen-arm"] for r in answers]
        assert abs(arms.count("canary") / len(arms) - 0.30) < 0.08, arms.count("canary")
        assert all(r.headers["x-raygen-model-sha256"] == digests[r.headers["x-raygen-arm"]]
                   for r in answers)  # fmt: skip
        for user in (f"user-{i}" for i in range(20)):
            seen = {ask(url, user).headers["x-raygen-arm"] for _ in range(4)}
            assert len(seen) == 1, (user, seen)

        address = ray.get_runtime_context().gcs_address
        status = raygen("serve", "status", "--address", address)
        assert status.returncode == 0, status.stderr
        assert "primary  70%" in status.stdout and "canary   30%" in status.stdout

        failures: list[str] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                r = ask(url)
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")

        clients = [threading.Thread(target=load) for _ in range(3)]
        for c in clients:
            c.start()
        try:
            promoted = raygen("serve", "promote", "canaried", "--address", address)
            assert promoted.returncode == 0, promoted.stderr
            assert "canary promoted (promoted by hand)" in promoted.stdout
            wait_for(lambda: app_deployments("canaried") == {"primary"}, 120)
        finally:
            done.set()
            for c in clients:
                c.join()
        assert failures == [], failures[:3]
        after = [ask(url) for _ in range(10)]
        assert {(r.headers["x-raygen-arm"], r.headers["x-raygen-model-sha256"]) for r in after} == {
            ("primary", digests["canary"])
        }
        (decision,) = decisions(new)
        assert decision["action"] == "promote" and decision["by"]
        assert decision["figures"]["canary"]["requests"] >= 80
        (same,) = decisions(old)
        assert same["figures"] == decision["figures"] and same["action"] == "promote"
        again = raygen("serve", "rollback", "canaried", "--address", address)
        assert again.returncode == 2 and "no canary rollout to decide" in again.stderr
    finally:
        stop("canaried")


def test_a_failing_canary_is_rolled_back_and_a_good_one_promoted_on_their_figures(
    models, serve_port, tmp_path
):
    from ray import serve

    old, new, broken = models["old"], models["new"], models["broken"]
    audit = str(tmp_path / "none.json")
    rollout = {"traffic_percent": 50, "rollback_if": {"error_rate": 0.05}}
    bad = {"model": str(broken), "audit": audit, **rollout, "promote_after": {"requests": 1000}}
    url = start("canaried", old, serve_port, canary=bad, audit=passed_audit(old))
    primary_replicas = replica_actors("canaried", "primary")
    try:
        # Sampling on NaN logits fails: canary answers are (nearly all) 500s.
        answers = []
        while not decisions(broken):
            answers.append(ask(url, temperature=1.0))
            assert len(answers) < 200, "no decision"
        (decision,) = decisions(broken)
        assert decision["action"] == "rollback" and decision["by"] == "raygen"
        assert "error rate" in decision["reason"]
        figures = decision["figures"]
        # Judged at its 10th request, most of which failed.
        assert figures["canary"]["requests"] == 10 and figures["canary"]["errors"] >= 8
        assert figures["primary"]["errors"] == 0
        assert all(r.status_code == 200 for r in answers if r.headers["x-raygen-arm"] == "primary")
        wait_for(lambda: app_deployments("canaried") == {"primary"}, 120)
        assert all(ask(url, temperature=1.0).status_code == 200 for _ in range(10))
        # The primary's replicas were never restarted: it did not change.
        assert replica_actors("canaried", "primary") == primary_replicas

        # A good canary, registered and added to the running application, is promoted on
        # its figures, and its registered version says so.
        from raygen.jobs.registry import register_by_path, resolve_model

        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        assert register_by_path(str(new), "code-lm", store).ref == "models:/code-lm/1"
        quick = {**rollout, "promote_after": {"requests": 20, "seconds": 0}}
        good = {"model": str(new), "audit": audit, **quick}
        start("canaried", old, serve_port, canary=good, audit=passed_audit(old))
        assert replica_actors("canaried", "primary") == primary_replicas
        sent = 0
        while not decisions(new):
            assert ask(url).status_code == 200
            sent += 1
            assert sent < 200, "no decision"
        (decision,) = decisions(new)
        assert decision["action"] == "promote" and "within every threshold" in decision["reason"]
        wait_for(lambda: app_deployments("canaried") == {"primary"}, 120)
        about = serve.get_app_handle("canaried").about.remote().result(timeout_s=30)
        assert about["model"] == str(new) and list(about["arms"]) == ["primary"]
        version = resolve_model("models:/code-lm@serving", store)
        rollout_tag = json.loads(version.tags["rollout.canaried"])
        assert rollout_tag["action"] == "promote" and rollout_tag["arm"] == "canary"
        assert rollout_tag["figures"]["canary"]["requests"] >= 20
    finally:
        stop("canaried")


def test_a_canary_whose_answers_trip_the_blocklist_is_rolled_back(
    models, lm_run, serve_port, tmp_path
):
    old = models["old"]
    chatty = tmp_path / "chatty" / "model"
    word = one_word_model(Path(lm_run[1]["paths"]["model"]), chatty)
    canary = {
        "model": str(chatty),
        "audit": str(tmp_path / "none.json"),
        "traffic_percent": 50,
        "promote_after": {"requests": 1000},
        "rollback_if": {"filtered_rate": 0.2},
    }
    filters = {"blocklist": [rf"\b{word}\b"], "action": "refuse"}
    url = start("canaried", old, serve_port, canary=canary, filters=filters)
    try:
        answers = []
        while not decisions(chatty):
            answers.append(ask(url))
            assert len(answers) < 200, "no decision"
        assert all(r.status_code == 200 for r in answers)
        refused = [
            r for r in answers if r.json()["choices"][0]["finish_reason"] == "content_filter"
        ]
        assert refused and {r.headers["x-raygen-arm"] for r in refused} == {"canary"}
        (decision,) = decisions(chatty)
        assert decision["action"] == "rollback" and "filtered-output rate" in decision["reason"]
        figures = decision["figures"]
        assert figures["canary"]["filtered"] == figures["canary"]["requests"] == 10
        assert figures["primary"]["filtered"] == 0 and figures["primary"]["requests"] > 0
        wait_for(lambda: app_deployments("canaried") == {"primary"}, 120)
        assert {ask(url).headers["x-raygen-arm"] for _ in range(5)} == {"primary"}
    finally:
        stop("canaried")


def replica_actors(app: str, deployment: str) -> set[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in actors if a["name"].startswith(prefix)}


def test_a_canary_whose_audit_fails_gets_no_traffic_unless_overridden(models, serve_port, tmp_path):
    import ray

    address = ray.get_runtime_context().gcs_address
    spec = tmp_path / "canary.yaml"
    audit = passed_audit(models["old"])  # the primary's gate is open, the canary's is not
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "gated",
                "model": str(models["old"]),
                "route_prefix": "/gated",
                "audit": audit,
                "replica": {"num_cpus": 0.25},
                "http": {"port": serve_port},
                "canary": {
                    "model": str(models["new"]),
                    "audit": str(tmp_path / "none.json"),
                    "traffic_percent": 10,
                },
            }
        )
    )
    refused = raygen("serve", str(spec), "--detach", "--address", address)
    assert refused.returncode == 3, refused.stderr
    assert "the canary of gated refused by its audit" in refused.stderr
    assert "Nothing was deployed" in refused.stderr
    from ray import serve

    assert "gated" not in serve.status().applications
    overridden = raygen(
        "serve", str(spec), "--detach", "--address", address, "--override-audit", "try it"
    )
    try:
        assert overridden.returncode == 0, overridden.stderr
        assert "canary:" in overridden.stdout and "answers 10% of requests" in overridden.stdout
        (record,) = [r for r in list_records(str(models["new"])) if r["event"] == "audit_override"]
        assert record["arm"] == "canary" and record["reason"] == "try it"
        assert not [r for r in list_records(str(models["old"])) if r["event"] == "audit_override"]
    finally:
        stop("gated")

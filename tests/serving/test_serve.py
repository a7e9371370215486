"""Real Ray Serve on the session's local Ray, real HTTP: the OpenAI client, images, auth,
bad input, batching, autoscaling and replica replacement."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from raygen.serving.deploy import replica_counts
from tests.conftest import TEST_API_KEYS, TEST_API_KEYS_ENV, TINY_UNET, raygen
from tests.serving.deployments import start, stop, wait_for

KEY = TEST_API_KEYS[1]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module", autouse=True)
def trained(lm_run, diffusion_run):
    """Train first: the training fixtures need every CPU, which deployed replicas hold."""
    return lm_run, diffusion_run


@pytest.fixture(scope="module")
def lm_url(lm_run, serve_port, tmp_path_factory):
    # A copy: later tests may retrain the shared run and rewrite its model/.
    model = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(lm_run[1]["paths"]["model"], model)
    url = start(
        "code",
        model,
        serve_port,
        auth={"api_keys_env": TEST_API_KEYS_ENV},
        limits={"max_prompt_tokens": 48, "max_tokens": 40, "max_body_bytes": 4096},
        filters={"blocklist": [r"\bdef\b"], "action": "redact"},
    )
    yield url, model
    stop("code")


@pytest.fixture
def client(lm_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{lm_url[0]}/v1", api_key=KEY, max_retries=0)


def tokens_of(model: Path, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False)["input_ids"])


def test_openai_client_completes_prompts_times_n_with_usage(client, lm_url):
    prompts = ["import os\n", "class Parser:\n"]
    done = client.completions.create(
        model="code", prompt=prompts, max_tokens=12, n=2, temperature=0.9, seed=7
    )
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("length", "stop") for c in done.choices)
    assert any(c.text for c in done.choices)
    assert done.usage.prompt_tokens == sum(tokens_of(lm_url[1], p) for p in prompts)
    assert 0 < done.usage.completion_tokens <= 4 * 12
    again = client.completions.create(
        model="code", prompt=prompts, max_tokens=12, n=2, temperature=0.9, seed=7
    )
    assert [c.text for c in again.choices] == [c.text for c in done.choices]


def test_streamed_chunks_add_up_to_the_same_completion(client, lm_url):
    request = {"model": "code", "prompt": "for i in range(", "max_tokens": 20, "seed": 3}
    whole = client.completions.create(**request).choices[0]
    chunks = list(
        client.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    assert chunks[-2].choices[0].finish_reason == whole.finish_reason
    assert chunks[-1].usage.completion_tokens > 0  # the usage chunk comes last
    with httpx.stream(
        "POST", f"{lm_url[0]}/v1/completions", json={**request, "stream": True}, headers=AUTH
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_sequences_end_the_completion_before_them(client):
    request = {"model": "code", "prompt": "import os\nimport ", "max_tokens": 30, "temperature": 0}
    free = client.completions.create(**request).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop, f"greedy completion too short to test stop sequences: {free!r}"
    cut = client.completions.create(**request, stop=[stop]).choices[0]
    assert cut.text == free[: free.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = client.completions.create(**request, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_blocklist_redacts_or_withholds_case_insensitively():
    from raygen.serving.app import OutputFilter

    redact = OutputFilter([r"\bdef\b", "secret[0-9]+"], "redact")
    assert redact.apply("Def f(): SECRET42 undefined") == (
        "[REDACTED] f(): [REDACTED] undefined",
        True,
    )
    assert redact.apply("nothing here") == ("nothing here", False)
    assert OutputFilter(["x"], "refuse").apply("a x b") == ("", True)
    assert OutputFilter([], "refuse").apply("anything") == ("anything", False)


def test_models_lists_the_deployment_and_healthz_needs_no_key(lm_url):
    url = lm_url[0]
    models = httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in models] == ["code"]
    assert models[0]["raygen"]["kind"] == "language-model"
    assert models[0]["raygen"]["context_length"] >= 64
    audit = models[0]["raygen"]["audit"]
    assert audit["overridden"] and not audit["passed"] and audit["user"]
    assert audit["reason"] == "serving mechanics test"
    assert models[0]["raygen"]["limits"]["max_tokens"] == 40
    assert str(lm_url[1].parent) not in json.dumps(models)  # no storage paths
    assert httpx.get(f"{url}/healthz").json()["status"] == "ready"
    assert httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/completions"]
    # One model by its id, as the openai client asks for it; another id is a 404 naming ours.
    assert httpx.get(f"{url}/v1/models/code", headers=AUTH).json() == models[0]
    missing = httpx.get(f"{url}/v1/models/gpt-4", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "this server serves `code`" in missing.json()["error"]["message"]


def test_the_openai_client_retrieves_the_model(client):
    assert client.models.retrieve("code").id == "code"
    assert [m.id for m in client.models.list()] == ["code"]


def test_a_model_without_a_chat_template_refuses_chat_naming_the_fix(lm_url):
    body = {"model": "code", "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx.post(f"{lm_url[0]}/v1/chat/completions", json=body, headers=AUTH)
    assert refused.status_code == 404
    message = refused.json()["error"]["message"]
    assert "has no chat template" in message and "data.format: chat" in message
    paths = httpx.get(f"{lm_url[0]}/openapi.json", headers=AUTH).json()["paths"]
    assert "/v1/chat/completions" not in paths and "/v1/completions" in paths


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}]
)
def test_missing_or_wrong_api_key_is_401(lm_url, headers):
    body = {"model": "code", "prompt": "x", "max_tokens": 2}
    response = httpx.post(f"{lm_url[0]}/v1/completions", json=body, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{lm_url[0]}/v1/models", headers=headers).status_code == 401


def test_api_keys_never_reach_ray_logs(lm_url, ray_session):
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="ignore")
            assert all(key not in text for key in TEST_API_KEYS), path


LONG_PROMPT = "x = 1\n" * 40  # over the test limit of 48 prompt tokens
BAD_REQUESTS = [
    ("{not json", 400, None),
    ('["a list"]', 400, None),
    ({"model": "code", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "code", "prompt": 5}, 400, "prompt"),
    ({"model": "code", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "code", "prompt": "x", "max_tokens": 41}, 400, "max_tokens"),
    ({"model": "code", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": "code", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "code", "prompt": LONG_PROMPT}, 400, "prompt"),
    ({"model": "code", "prompt": []}, 400, "prompt"),
    ({"model": "code", "prompt": "x", "n": 17}, 400, "n"),
    ({"model": "code", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "code", "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"model": "code", "prompt": [[1, 2], [999_999]]}, 400, "prompt"),
    ({"model": "code", "prompt": "x", "best_of": 2}, 400, "best_of"),
    ({"model": "code", "prompt": "x", "tempreature": 1}, 400, "tempreature"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": "code", "prompt": "x" * 5000}, 413, None),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_json_error_naming_the_field(lm_url, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{lm_url[0]}/v1/completions", content=content, headers=AUTH)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    if param:
        assert param in error["message"]


def test_prompt_plus_max_tokens_beyond_the_models_context_is_refused(lm_run, serve_port, tmp_path):
    # A model with a 32-token context behind the default limits.
    model = tmp_path / "model"
    shutil.copytree(lm_run[1]["paths"]["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["n_positions"] = 32
    (model / "config.json").write_text(json.dumps(config))
    _shrink_positions(model, 32)
    # Its blocklist matches any character: every completion is withheld, and counted.
    refuse_all = {"blocklist": [r"[\s\S]"], "action": "refuse"}
    url = start("short", model, serve_port, filters=refuse_all)
    try:
        body = {"model": "short", "prompt": "import os\n", "max_tokens": 30, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body)
        assert response.status_code == 400
        assert "context of 32 tokens" in response.json()["error"]["message"]
        body["max_tokens"] = 8
        choice = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]
        assert choice == {
            "index": 0,
            "text": "",
            "logprobs": None,
            "finish_reason": "content_filter",
        }
        assert wait_for_metrics("short", ["ray_raygen_filtered_outputs_total{", 'action="refuse"'])
    finally:
        stop("short")


def _shrink_positions(model: Path, n: int) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    for name in list(weights):
        if name.endswith("wpe.weight"):
            weights[name] = weights[name][:n].contiguous()
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


def test_concurrent_requests_are_batched_and_all_answered(lm_url):
    def one(i: int) -> httpx.Response:
        body = {"model": "code", "prompt": f"x{i} = ", "max_tokens": 8, "seed": i}
        return httpx.post(f"{lm_url[0]}/v1/completions", json=body, headers=AUTH, timeout=120)

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    assert [r.status_code for r in responses] == [200] * 32
    sizes = [int(r.headers["x-raygen-batch-size"]) for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 8


def test_batch_sizes_requests_latencies_and_tokens_reach_prometheus_metrics(lm_url):
    for metric in [
        "ray_raygen_batch_size_count",
        "ray_serve_num_http_requests_total",
        "ray_serve_http_request_latency_ms_count",
        "ray_serve_deployment_replica_healthy",
        "ray_raygen_completion_tokens_total",
        "ray_raygen_model_load_seconds",
    ]:
        assert wait_for_metrics("code", [metric + "{"]), metric


def wait_for_metrics(app: str, parts: list[str], timeout_s: float = 60) -> bool:
    """Whether a line of Ray's Prometheus endpoint for `app` has all `parts` (metrics
    are exported every few seconds)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        for line in text.splitlines():
            if f'application="{app}"' in line and all(p in line for p in parts):
                return True
        time.sleep(2)
    return False


# --- images -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_urls(diffusion_run, serve_port, tmp_path_factory):
    """The trained unconditional UNet, and an untrained 3-class DDIM one."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    conditional = tmp_path_factory.mktemp("conditional") / "model"
    unet = UNet2DModel(**TINY_UNET, num_class_embeds=3)
    DDIMPipeline(unet, DDIMScheduler(num_train_timesteps=100)).save_pretrained(conditional)
    urls = (
        start("digits", diffusion_run[1]["paths"]["model"], serve_port),
        start("classes", conditional, serve_port),
    )
    yield urls
    stop("digits")
    stop("classes")


def decode(item: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def test_images_come_back_as_pngs_of_the_models_size(image_urls):
    url = image_urls[0]
    body = {"n": 3, "seed": 5, "num_inference_steps": 10}
    data = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).json()["data"]
    images = [decode(item) for item in data]
    assert [im.shape for im in images] == [(8, 8)] * 3 and images[0].dtype == np.uint8
    assert not np.array_equal(images[0], images[1])
    again = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).json()["data"]
    assert [a["b64_json"] for a in again] == [d["b64_json"] for d in data]


def test_image_seeds_at_the_edges_answer_and_spare_their_batch(image_urls):
    url = image_urls[0]
    valid = {"n": 1, "seed": 5, "num_inference_steps": 5}
    alone = httpx.post(f"{url}/v1/images/generations", json=valid, timeout=120).json()["data"]
    for seed, status in [
        (2**63 - 1, 200),
        (-(2**63), 200),
        (2**64, 400),
        (18_446_744_073_709, 200),
    ]:
        body = {"n": 2, "seed": seed, "num_inference_steps": 5}
        with ThreadPoolExecutor(2) as pool:  # sent together: denoised in one batch
            other = pool.submit(httpx.post, f"{url}/v1/images/generations", json=valid, timeout=120)
            response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
        assert response.status_code == status, (seed, response.text)
        if status == 200:
            first, second = (decode(item) for item in response.json()["data"])
            assert not np.array_equal(first, second)
        else:
            assert response.json()["error"]["param"] == "seed"
        assert other.result().json()["data"] == alone  # the same image in any batch


def test_class_labels_and_image_limits(image_urls):
    unconditional, conditional = image_urls
    body = {"n": 2, "seed": 1, "num_inference_steps": 5, "class_label": 2}
    ok = httpx.post(f"{conditional}/v1/images/generations", json=body, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    for url, change, param in [
        (conditional, {"class_label": 3}, "class_label"),
        (unconditional, {}, "class_label"),
        (conditional, {"class_label": None, "n": 9}, "n"),
        (conditional, {"num_inference_steps": 101}, "num_inference_steps"),
        (conditional, {"size": "512x512"}, "size"),
        (conditional, {"prompt": "a cat"}, "prompt"),
    ]:
        response = httpx.post(f"{url}/v1/images/generations", json={**body, **change})
        assert response.status_code == 400, (change, response.text)
        assert response.json()["error"]["param"] == param
    wrong = httpx.post(f"{conditional}/v1/completions", json={"model": "classes", "prompt": "x"})
    assert wrong.status_code == 404 and "/v1/images/generations" in wrong.text


# --- scaling ------------------------------------------------------------------------------


def test_autoscales_from_zero_to_two_and_back_to_zero(lm_run, serve_port, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(lm_run[1]["paths"]["model"], model)
    autoscaling = {
        "min_replicas": 0,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 3,
    }
    url = start("elastic", model, serve_port, autoscaling=autoscaling)
    try:
        assert replica_counts("elastic").get("RUNNING", 0) == 0
        cold = time.monotonic()
        body = {"model": "elastic", "prompt": "import ", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200
        print(f"cold start: first request answered in {time.monotonic() - cold:.1f} s")

        stop_load = threading.Event()
        statuses: list[int] = []

        def load() -> None:
            long = {**body, "max_tokens": 40}
            while not stop_load.is_set():
                r = httpx.post(f"{url}/v1/completions", json=long, timeout=120)
                statuses.append(r.status_code)

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: replica_counts("elastic").get("RUNNING", 0) == 2, 90)
        finally:
            stop_load.set()
            for t in threads:
                t.join()
        assert statuses and set(statuses) == {200}
        wait_for(lambda: replica_counts("elastic").get("RUNNING", 0) == 0, 90)
    finally:
        stop("elastic")


def test_a_dead_replica_is_replaced_while_the_other_keeps_answering(lm_run, serve_port, tmp_path):
    import ray

    model = tmp_path / "model"
    shutil.copytree(lm_run[1]["paths"]["model"], model)
    fixed = {"min_replicas": 2, "max_replicas": 2}
    url = start("sturdy", model, serve_port, autoscaling=fixed)
    try:
        wait_for(lambda: replica_counts("sturdy").get("RUNNING", 0) == 2, 60)
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::sturdy#primary#")
        ]
        assert len(names) == 2
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        body = {"model": "sturdy", "prompt": "import ", "max_tokens": 4}
        for _ in range(5):
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        wait_for(lambda: replica_counts("sturdy").get("RUNNING", 0) == 2, 60)
    finally:
        stop("sturdy")


def _reweighted(model: Path) -> None:
    """The same architecture with other weights: another model, another sha256."""
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


def _p99(seconds: list[float]) -> float:
    return seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]


def _answered(text: str, stream: bool) -> bool:
    """A whole answer: choices, or a stream of chunks (no error event) ending in [DONE]."""
    if not stream:
        return bool(json.loads(text).get("choices"))
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return False
    return all("choices" in json.loads(event) for event in events[:-1])


def test_an_update_under_load_drops_no_request_and_the_new_model_answers(
    lm_run, serve_port, tmp_path
):
    """`raygen serve SPEC` on a running application: requests (whole and streamed) keep
    coming and every one is answered; the new model answers once the update is done."""
    import ray

    from raygen.jobs.model_hash import model_sha256
    from raygen.serving.gate import list_records

    old, new = tmp_path / "old" / "model", tmp_path / "new" / "model"
    shutil.copytree(lm_run[1]["paths"]["model"], old)
    shutil.copytree(lm_run[1]["paths"]["model"], new)
    _reweighted(new)
    old_sha, new_sha = model_sha256(str(old)), model_sha256(str(new))
    url = start("rolling", old, serve_port)
    answers: list[tuple[float, float, str]] = []  # (sent at, seconds, model sha256)
    failures: list[str] = []
    done = threading.Event()

    def load(stream: bool) -> None:
        body = {"model": "rolling", "prompt": "import ", "max_tokens": 8, "stream": stream}
        with httpx.Client(timeout=120) as http:
            while not done.is_set():
                sent = time.monotonic()
                try:
                    r = http.post(f"{url}/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200 or not _answered(r.text, stream):
                    failures.append(f"{r.status_code}: {r.text[-300:]}")
                    continue
                sha = r.headers["x-raygen-model-sha256"]
                answers.append((sent, time.monotonic() - sent, sha))

    spec = tmp_path / "rolling.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "rolling",
                "model": str(new),
                "route_prefix": "/rolling",
                "audit": str(tmp_path / "none.json"),
                "replica": {"num_cpus": 0.25},
                "http": {"port": serve_port},
                "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
            }
        )
    )
    running: list[int] = []  # replicas answering, sampled through the update

    def watch() -> None:
        while not done.is_set():
            running.append(replica_counts("rolling").get("RUNNING", 0))
            time.sleep(0.1)

    address = ray.get_runtime_context().gcs_address
    clients = [threading.Thread(target=load, args=(s,)) for s in (False, False, True)]
    try:
        for c in clients:
            c.start()
        time.sleep(2)
        began = time.monotonic()
        watcher = threading.Thread(target=watch)
        watcher.start()
        updated = raygen(
            "serve", str(spec), "--detach", "--address", address, "--override-audit", "update"
        )
        ended = time.monotonic()
        time.sleep(3)
    finally:
        done.set()
        for thread in [*clients, watcher]:
            thread.join()
        stop("rolling")
    assert updated.returncode == 0, updated.stderr
    assert "updating it in place" in updated.stdout and "updated rolling" in updated.stdout
    assert failures == [], failures[:3]
    # The new replica loaded the model and passed the gate before the old one stopped.
    assert min(running) >= 1, running
    during = sorted(s for sent, s, _ in answers if began <= sent <= ended)
    assert len(during) > 10, len(during)
    before = sorted(s for sent, s, _ in answers if sent < began)
    print(
        f"update under load: {len(during)} requests answered during it, p99 "
        f"{_p99(during):.2f} s ({_p99(before):.2f} s before it)"
    )
    assert {sha for sent, _, sha in answers if sent < began} == {old_sha}
    # Sent a moment after the update returned: the old replicas no longer take requests.
    assert {sha for sent, _, sha in answers if sent > ended + 1} == {new_sha}
    (record,) = [r for r in list_records(str(new)) if r["event"] == "deployed"]
    assert record["replaced"] == {"model": str(old), "model_sha256": old_sha}


def test_a_failed_update_puts_the_application_back_as_it_was(lm_run, serve_port, tmp_path):
    """New replicas that cannot start (here: their API keys are not set where they run):
    the update is refused with the replica's reason, the old replicas never stopped
    answering, and the application is declared as before again."""
    from raygen.serving.deploy import deploy, resolve_deploy_spec
    from raygen.serving.errors import DeployError
    from raygen.serving.gate import gate
    from raygen.serving.spec import DeploySpec

    model = tmp_path / "model"
    shutil.copytree(lm_run[1]["paths"]["model"], model)
    url = start("steady", model, serve_port)
    raw = {
        "name": "steady",
        "model": str(model),
        "audit": str(tmp_path / "none.json"),
        "route_prefix": "/steady",
        "replica": {"num_cpus": 0.25},
        "http": {"port": serve_port},
        "auth": {"api_keys_env": "RAYGEN_TEST_KEYS_NOWHERE"},
    }
    # Not embedded: the driver cannot see the cluster's environment, the replicas can.
    spec = resolve_deploy_spec(DeploySpec.model_validate(raw), "test", embedded=False)
    try:
        with pytest.raises(DeployError) as failed:
            deploy(gate(spec, override_reason="failed update test"), embedded=False)
        message = str(failed.value)
        assert "the update of steady failed" in message and "RAYGEN_TEST_KEYS_NOWHERE" in message
        assert f"It serves {model} again" in message
        body = {"model": "steady", "prompt": "import ", "max_tokens": 3}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        stop("steady")


# --- the CLI ------------------------------------------------------------------------------


def test_cli_deploys_detached_lists_and_shuts_down(lm_run, serve_port, tmp_path):
    import ray

    address = ray.get_runtime_context().gcs_address
    spec = tmp_path / "detached.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "detached",
                "model": lm_run[1]["paths"]["model"],
                "route_prefix": "/detached",
                "audit": str(tmp_path / "none.json"),
                "replica": {"num_cpus": 0.25},
                "http": {"port": serve_port},
            }
        )
    )
    refused = raygen("serve", str(spec), "--detach", "--address", address)
    assert refused.returncode == 3 and "none.json does not exist" in refused.stderr
    assert "Nothing was deployed" in refused.stderr
    done = raygen(
        "serve", str(spec), "--detach", "--address", address, "--override-audit", "demo day"
    )
    assert done.returncode == 0, done.stderr
    assert "deployed detached (language-model)" in done.stdout
    from raygen.serving.gate import list_records

    override, deployed = list_records(lm_run[1]["paths"]["model"])[-2:]
    assert override["event"] == "audit_override" and override["reason"] == "demo day"
    assert override["failing"][0].endswith("run `raygen audit` on the model first")
    assert deployed["name"] == "detached" and deployed["override"] == override["record"]
    body = {"model": "detached", "prompt": "import ", "max_tokens": 3}
    url = f"http://127.0.0.1:{serve_port}/detached/v1/completions"
    assert httpx.post(url, json=body, timeout=60).status_code == 200
    listed = raygen("serve", "status", "--address", address)
    assert "detached  RUNNING  replicas: 1 running" in listed.stdout, listed.stderr
    done = raygen("serve", "shutdown", "detached", "--address", address)
    assert done.returncode == 0 and "shut down detached" in done.stdout
    missing = raygen("serve", "shutdown", "detached", "--address", address)
    assert missing.returncode == 2
    assert "No application named 'detached' is running" in missing.stderr
    assert "Traceback" not in missing.stderr

"""Serving: `/v1/completions` and `/v1/chat/completions` of raygen on Ray Serve against (a)
a plain FastAPI + uvicorn app calling the same model one request at a time, (b) raygen
with batching off, and (c) raygen during a canary rollout (half the requests relayed from
the primary's replica to the canary's, a copy of the model; two replicas of 1 CPU).

    python benchmarks/serving.py      # ~8 min on 2 cores

The model is the quickstart's code LM shape, trained briefly here, given a plain chat
template (no new tokens) so both routes serve it. Every server gets one CPU (one replica of
1 CPU; uvicorn with torch on 1 thread). Each request asks for 16 greedy tokens of a
different stdlib snippet (chat: the snippet as the user's turn); 1, 8 and 32 clients send
requests back to back. Reported: requests/s and p50/p99 latency, and for streamed requests
the time to the first token (p50/p99). Also measured: the cold start of a scale-from-zero
deployment (first request until its answer) and the time for the autoscaler to add a
second replica under load. Targets: at 32 clients raygen >= 3x (a)'s throughput, for
completions and chat; at 1 client raygen's p50 <= Ray Serve's empty-handler floor + 3 ms
(the same route with an empty handler is timed on Serve and on uvicorn, 1 client).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, print_table, write_results  # noqa: E402

MAX_TOKENS, CONCURRENCY = 16, (1, 8, 32)
# A chat template that adds no tokens: the code model serves chat as it is.
CHAT_TEMPLATE = (
    "{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}# assistant: {% endif %}"
)
PLAIN_APP = """
import threading, torch
from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
lock = threading.Lock()
app = FastAPI()

@app.post("/v1/completions")
def complete(body: dict) -> dict:
    ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
    with lock, torch.inference_mode():
        out = model.generate(ids, max_new_tokens=body["max_tokens"], do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    return {"choices": [{"text": text, "index": 0}]}

@app.post("/v1/chat/completions")
def chat(body: dict) -> dict:
    prompt = tokenizer.apply_chat_template(body["messages"], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with lock, torch.inference_mode():
        out = model.generate(ids, max_new_tokens=body["max_tokens"], do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    return {"choices": [{"message": {"role": "assistant", "content": text}, "index": 0}]}

@app.post("/empty/v1/completions")
def empty(body: dict) -> dict:
    return {"choices": [{"text": "", "index": 0}]}
"""


def prompts(n: int) -> list[str]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")):
        lines = path.read_text(errors="ignore").splitlines()
        for i in range(0, len(lines) - 3, 40):
            out.append("\n".join(lines[i : i + 3]) + "\n")
            if len(out) == n:
                return out
    return out


def request(route: str, text: str, max_tokens: int = MAX_TOKENS) -> tuple[str, dict[str, Any]]:
    """(path, body) of one greedy request on `route` (`completions` or `chat`)."""
    if route == "chat":
        messages = [{"role": "user", "content": text}]
        return "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens}
    return "/v1/completions", {"prompt": text, "max_tokens": max_tokens}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(
    url: str,
    model: str,
    clients: int,
    requests: int,
    texts: list[str],
    route: str = "completions",
    stream: bool = False,
) -> dict[str, float]:
    """`clients` concurrent clients sending `requests` in all: requests/s and latency
    percentiles; streamed, also the time to the first token's chunk."""
    import httpx

    latencies: list[float] = []
    first_tokens: list[float] = []
    queue = list(range(requests))

    async def send(http: httpx.AsyncClient, text: str, max_tokens: int = MAX_TOKENS) -> None:
        path, body = request(route, text, max_tokens)
        body = {"model": model, "temperature": 0, "stream": stream, **body}
        start = time.perf_counter()
        async with http.stream("POST", url + path, json=body) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"{url}: {reply.status_code} {await reply.aread()}")
            first = None
            async for line in reply.aiter_lines():
                if first is None and stream and line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    if choice.get("text") or choice.get("delta", {}).get("content"):
                        first = time.perf_counter() - start
        latencies.append(time.perf_counter() - start)
        if first is not None:
            first_tokens.append(first)

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            await send(http, texts[queue.pop() % len(texts)])

    async with httpx.AsyncClient(timeout=300) as http:
        await send(http, "import", 4)  # one warm-up request, not counted
        latencies.clear()
        first_tokens.clear()
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - began
    figures = {
        "rps": requests / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }
    if first_tokens:
        figures.update(
            ttft_p50_ms=1000 * statistics.median(first_tokens),
            ttft_p99_ms=1000 * percentile(first_tokens, 0.99),
        )
    return figures


def train_model(work: Path) -> Path:
    import yaml

    from raygen.jobs.launch import launch
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec

    spec = yaml.safe_load((ROOT / "jobs/examples/code-lm-tiny.yaml").read_text())
    spec["train"].update(max_steps=60, eval_every=60, checkpoint_every=60, warmup_steps=5)
    spec["run"] = {"storage": str(work / "runs")}
    result = launch(validate_spec(TrainSpec, spec, "bench"))
    # A copy of the model whose tokenizer has a chat template: served on both routes.
    from transformers import AutoTokenizer

    model = work / "model"
    shutil.copytree(result["paths"]["model"], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    return model


def deploy(
    model: Path, name: str, port: int, batch: int, canary: Path | None = None, **autoscaling: Any
) -> str:
    from raygen.serving.deploy import deploy as serve_deploy
    from raygen.serving.deploy import resolve_deploy_spec
    from raygen.serving.gate import gate_arms
    from raygen.serving.spec import DeploySpec

    raw = {
        "name": name,
        "model": str(model),
        "audit": str(model.parent / "no-audit.json"),
        "route_prefix": f"/{name}",
        "replica": {"num_cpus": 1, "max_ongoing_requests": 64},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, **autoscaling},
        "batching": {"max_batch_size": batch},
        "limits": {"max_prompt_tokens": 256},
        "http": {"port": port},
    }
    if canary is not None:  # half the requests relayed to a canary deployment like it
        raw["canary"] = {"model": str(canary), "audit": raw["audit"], "traffic_percent": 50}
        raw["canary"]["promote_after"] = {"requests": 10**9}
    spec = resolve_deploy_spec(DeploySpec.model_validate(raw), "bench")
    # A throughput measurement, not a deployment: the override is recorded as such.
    spec = gate_arms(spec, override_reason="benchmark: throughput only")
    return serve_deploy(spec, embedded=True)["url"]


def serve_floor(port: int) -> str:
    """A Ray Serve app with the same route and JSON but no model: the fixed cost of Serve's
    HTTP proxy and the hop to a replica, which every Serve application pays."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 1})
    @serve.ingress(app)
    class Empty:
        @app.post("/v1/completions")
        def complete(self, body: dict) -> dict:
            return {"choices": [{"text": "", "index": 0}]}

    serve.run(Empty.bind(), name="floor", route_prefix="/floor")
    return f"http://127.0.0.1:{port}/floor"


def main() -> None:
    import httpx
    import ray
    from ray import serve

    from raygen.cluster.simulate import free_port
    from raygen.serving.deploy import replica_counts

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    model = train_model(work)
    texts = prompts(256)
    rows: list[dict[str, Any]] = []

    def measure(server: str, url: str, name: str, route: str = "completions", **how) -> None:
        for clients in CONCURRENCY:
            figures = asyncio.run(
                load(url, name, clients, max(16, 4 * clients), texts, route, **how)
            )
            rows.append({"server": server, "route": route, "clients": clients, **figures})
            print(json.dumps(rows[-1]), flush=True)

    port = free_port()
    url = deploy(model, "batched", port, batch=32)
    measure("raygen", url, "batched")
    measure("raygen", url, "batched", "chat")
    measure("raygen, streamed", url, "batched", stream=True)
    measure("raygen, streamed", url, "batched", "chat", stream=True)
    serve.delete("batched")
    measure("raygen, batching off", deploy(model, "unbatched", port, batch=1), "unbatched")
    serve.delete("unbatched")
    # A rollout: the primary's replica answers half the requests and relays the other half
    # to a canary's replica (each on 1 CPU, the load generator sharing them).
    canary = work / "canary" / "model"
    shutil.copytree(model, canary)
    url = deploy(model, "rollout", port, batch=32, canary=canary)
    for clients in (1, 32):
        figures = asyncio.run(load(url, "rollout", clients, max(16, 4 * clients), texts))
        rows.append({"server": "raygen, 50% canary", "route": "completions", "clients": clients})
        rows[-1].update(figures)
        print(json.dumps(rows[-1]), flush=True)
    serve.delete("rollout")
    floor_url = serve_floor(port)
    rows.append({"server": "Ray Serve, empty handler", "route": "completions", "clients": 1})
    rows[-1].update(asyncio.run(load(floor_url, "floor", 1, 64, texts)))
    serve.delete("floor")

    plain_port = free_port()
    (work / "plain_app.py").write_text(PLAIN_APP.replace("MODEL_DIR", repr(str(model))))
    plain = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "plain_app:app", "--port", str(plain_port)],
        cwd=work,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    plain_url = f"http://127.0.0.1:{plain_port}"
    for _ in range(120):
        try:
            httpx.post(f"{plain_url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
            break
        except httpx.HTTPError:
            time.sleep(0.5)
    try:
        measure("FastAPI + uvicorn, one at a time", plain_url, "plain")
        measure("FastAPI + uvicorn, one at a time", plain_url, "plain", "chat")
        rows.append(
            {"server": "FastAPI + uvicorn, empty handler", "route": "completions", "clients": 1}
        )
        rows[-1].update(asyncio.run(load(f"{plain_url}/empty", "plain", 1, 64, texts)))
    finally:
        plain.terminate()
        plain.wait()

    # Scale from zero: the first request waits for a replica to start.
    url = deploy(
        model, "cold", port, batch=32, min_replicas=0, max_replicas=1, downscale_delay_s=600
    )
    started = time.perf_counter()
    first = {"model": "cold", "prompt": "import", "max_tokens": 4}
    httpx.post(f"{url}/v1/completions", json=first, timeout=300).raise_for_status()
    cold_start = time.perf_counter() - started
    serve.delete("cold")
    # Scale-up under load: 32 clients against 1 replica that may grow to 2.
    url = deploy(
        model, "grow", port, batch=8, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=0
    )
    began = time.perf_counter()

    async def until_two() -> float:
        task = asyncio.create_task(load(url, "grow", 32, 100_000, texts))
        while replica_counts("grow").get("RUNNING", 0) < 2 and time.perf_counter() - began < 300:
            await asyncio.sleep(0.25)
        task.cancel()
        return time.perf_counter() - began

    scale_up = asyncio.run(until_two())
    serve.delete("grow")
    ray.shutdown()

    by = {(r["server"], r["route"], r["clients"]): r for r in rows}
    plain_name = "FastAPI + uvicorn, one at a time"
    ratio_32 = by[("raygen", "completions", 32)]["rps"] / by[(plain_name, "completions", 32)]["rps"]
    chat_ratio_32 = by[("raygen", "chat", 32)]["rps"] / by[(plain_name, "chat", 32)]["rps"]
    p50_gap = (
        by[("raygen", "completions", 1)]["p50_ms"] - by[(plain_name, "completions", 1)]["p50_ms"]
    )
    # What of that gap any Ray Serve app pays (proxy + hop), the rest is raygen's own.
    floor_gap = (
        by[("Ray Serve, empty handler", "completions", 1)]["p50_ms"]
        - by[("FastAPI + uvicorn, empty handler", "completions", 1)]["p50_ms"]
    )
    print()
    print_table(
        rows,
        ["server", "route", "clients", "rps", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms"],
    )
    print(
        f"\nraygen / plain at 32 clients: {ratio_32:.2f}x requests/s (chat {chat_ratio_32:.2f}x); "
        f"p50 at 1 client: {p50_gap:+.1f} ms, of which Ray Serve's floor {floor_gap:+.1f} ms; "
        f"cold start {cold_start:.1f} s; second replica after {scale_up:.1f} s"
    )
    path = write_results(
        "serving",
        rows,
        {
            "max_tokens": MAX_TOKENS,
            "throughput_ratio_32_clients": ratio_32,
            "chat_throughput_ratio_32_clients": chat_ratio_32,
            "p50_gap_1_client_ms": p50_gap,
            "serve_floor_gap_1_client_ms": floor_gap,
            # What is left of the 1-client gap once Ray Serve's own floor is taken out.
            "raygen_gap_1_client_ms": p50_gap - floor_gap,
            "cold_start_s": cold_start,
            "scale_up_s": scale_up,
            "targets": {
                "throughput_ratio_32_clients": 3.0,
                "chat_throughput_ratio_32_clients": 3.0,
                "raygen_gap_1_client_ms": 3.0,
            },
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

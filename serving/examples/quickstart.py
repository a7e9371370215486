"""The quickstart, end to end (`make quickstart` runs it): train the tiny code model, deploy
it behind its audit, ask it for completions over HTTP, shut it down.

Every step is a plain `raygen` command; this script only strings them together:

    raygen train jobs/examples/code-lm-tiny.yaml
    raygen serve serving/examples/code-lm.yaml      # runs the audit first: the gate
    (HTTP requests to /v1/completions)

Extra arguments are passed to `raygen train` (e.g. `--set train.max_steps=20`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

TRAIN_SPEC = "jobs/examples/code-lm-tiny.yaml"
DEPLOY_SPEC = "serving/examples/code-lm.yaml"
PROMPTS = ["def read_config(path):\n", "import os\nimport sys\n\n", "class Cache:\n    def "]


def raygen(*args: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "raygen"), *args]


def call(url: str, key: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_serving(server: subprocess.Popen, timeout_s: float = 900) -> None:
    """Echo `raygen serve`'s output until it says it is serving (the audit passed, the app
    is up and its deployment recorded); exit if it stops first."""
    deadline = time.monotonic() + timeout_s
    for line in server.stdout:
        print(line, end="", flush=True)
        if line.startswith("serving until Ctrl-C"):
            threading.Thread(target=echo, args=(server.stdout,), daemon=True).start()
            return
        if time.monotonic() > deadline:
            break
    server.wait()
    sys.exit(server.returncode or "raygen serve stopped before serving")


def echo(stream) -> None:
    for line in stream:
        print(line, end="", flush=True)


def main(train_args: list[str]) -> None:
    key = os.environ.setdefault("RAYGEN_API_KEYS", "quickstart-key").split(",")[0]
    subprocess.run(raygen("train", TRAIN_SPEC, *train_args), check=True)
    print("\n$ raygen serve", DEPLOY_SPEC, flush=True)
    server = subprocess.Popen(raygen("serve", DEPLOY_SPEC), stdout=subprocess.PIPE, text=True)
    url = "http://127.0.0.1:8000"
    try:
        wait_serving(server)
        model = call(f"{url}/v1/models", key)["data"][0]
        about = model["raygen"]
        print(
            f"\nserving {model['id']} ({about['kind']}); audit passed: {about['audit']['passed']}"
        )
        done = call(
            f"{url}/v1/completions",
            key,
            {
                "model": "code-lm",
                "prompt": PROMPTS,
                "max_tokens": 40,
                "temperature": 0.7,
                "seed": 0,
            },
        )
        for prompt, choice in zip(PROMPTS, done["choices"], strict=True):
            print(f"\n--- prompt ---\n{prompt}--- completion ({choice['finish_reason']}) ---")
            print(choice["text"])
        print(f"\nusage: {done['usage']}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    print(
        "\nNext: the audit report is runs/code-lm-tiny/audit/audit.html; try\n"
        "  raygen train jobs/examples/digits-ddpm.yaml     # a diffusion model\n"
        "  raygen serve serving/examples/digits.yaml       # its image API (scales to zero)\n"
        "  raygen tune tuning/examples/code-lm-lr.yaml     # a sweep with early stopping\n"
        "  raygen train jobs/examples/unet256-s3-zero2.yaml --check   # S3 storage\n"
        "and README.md for clusters."
    )


if __name__ == "__main__":
    main(sys.argv[1:])

"""Experiment tracking in MLflow. Each training run is one MLflow run: its resolved spec as
parameters (flattened: `train.lr`, `deepspeed.zero_stage`), each `metrics.jsonl` row as
metrics at its step, tags that identify its data and model, and its spec, data stats,
samples and result as artifacts. A sweep is a parent run with one child run per trial.

Records go to MLflow from a thread of the driver (the process that runs `raygen train`, or a
sweep trial), never from the training workers, so tracking costs the steps nothing. A slow
or unreachable tracking server only delays records: they wait in memory and are retried
until the run ends; what is still unsent then is reported, and the run's next launch sends
the metric rows again (they stay in `metrics.jsonl`, and MLflow keeps one copy of a row sent
twice).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raygen.cluster.storage import is_remote, local_copy, read_text, write_text
from raygen.jobs.spec import TrackingSpec

logger = logging.getLogger(__name__)


EMBEDDED_DB = "mlflow.db"  # the embedded store's SQLite database, under run.storage
EMBEDDED_ARTIFACTS = "mlartifacts"  # beside a SQLite store's database
EMBEDDED_HOME_FOR_OBJECT_STORES = "~/.raygen/mlflow"  # SQLite cannot live in a bucket
TRACKING_FILE = "tracking.json"  # in the run dir: the MLflow run it continues on resume

PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the run under it
KIND_TAG = "raygen.kind"  # "train" or "sweep"
STATUS_TAG = "raygen.status"  # completed, failed; a trial's: completed, stopped_early, errored

# MLflow's limits: a batch holds at most 1000 metrics, 100 params; a value 6000 characters.
ROWS_PER_BATCH = 100
PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
# Backoff between retries of a record the store did not take (seconds, doubling).
FIRST_RETRY_S, LAST_RETRY_S = 1.0, 30.0
# MLflow errors that are the record's fault, not the store's: retrying cannot help.
PERMANENT_ERRORS = (
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
)


@dataclass(frozen=True)
class TrackingTarget:
    """Where a run's records go: an MLflow tracking URI and experiment."""

    uri: str
    experiment: str
    timeout_s: float

    @property
    def artifact_location(self) -> str | None:
        """A SQLite store keeps its artifacts beside its database (MLflow's own default is
        `./mlruns` of whichever process first creates the experiment)."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///") :]).parent / EMBEDDED_ARTIFACTS).as_uri()
        return None

    @property
    def browse(self) -> str:
        """How a user sees the runs: the server's address, or the command that serves the UI."""
        if self.uri.startswith(("http://", "https://")):
            return self.uri
        return f"mlflow ui --backend-store-uri {self.uri}"


def tracking_target(tracking: TrackingSpec, storage: str) -> TrackingTarget | None:
    """The spec's MLflow target (None: tracking is off): `tracking.mlflow.uri`, else
    MLFLOW_TRACKING_URI, else the embedded SQLite store under `storage`."""
    mlflow = tracking.mlflow
    if mlflow is False:
        return None
    uri = mlflow.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        home = EMBEDDED_HOME_FOR_OBJECT_STORES if is_remote(storage) else storage
        root = Path(os.path.expanduser(home)).resolve()
        uri = f"sqlite:///{root / EMBEDDED_DB}"
    return TrackingTarget(uri, mlflow.experiment, mlflow.timeout_s)


def metric_name(key: str) -> str:
    """`key` as MLflow accepts a metric name (letters, digits and `_-./ :`): a group's name
    from the data (`eval_loss/<group>`) may hold other characters."""
    return re.sub(r"[^\w./\- :]", "_", key)


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested spec as MLflow parameters: dotted keys, lists and nulls as JSON."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{prefix}{key}"] = text[:MAX_PARAM_CHARS]
    return out


def read_record(run_dir_record: str) -> dict[str, Any]:
    """A run's `tracking.json` (empty when it was never tracked)."""
    try:
        return json.loads(read_text(run_dir_record) or "{}")
    except json.JSONDecodeError:
        return {}


class Tracker:
    """Sends one run's records to MLflow from a background thread, in order.

    The first record starts the MLflow run, or continues the one `tracking.json` names
    when it is in the same store. Nothing here waits for MLflow except `finish`, and that
    at most `target.timeout_s`.
    """

    def __init__(
        self,
        target: TrackingTarget,
        record_uri: str,
        name: str,
        params: dict[str, str],
        tags: dict[str, str],
        parent_run_id: str | None = None,
        backlog: Callable[[], list[dict[str, Any]]] | None = None,
    ):
        """`backlog` gives the metric rows logged before this launch; once the run is
        started or continued, those the store does not have yet are sent first."""
        self.target, self.record_uri, self.name = target, record_uri, name
        self._params, self._tags, self._parent = params, tags, parent_run_id
        self._backlog = backlog
        self.given_step = 0  # the highest step of the rows handed to `log_rows`
        record = read_record(record_uri)
        same_store = record.get("uri") == target.uri and record.get("experiment") == (
            target.experiment
        )
        self._continue = record.get("run_id") if same_store else None
        # Metric rows up to this step reached the store in an earlier launch.
        self.logged_step: int = record.get("logged_step", 0) if same_store else 0
        self.run_id: str | None = None
        self.error: str | None = None  # the last failure, while records wait
        self.dropped: list[str] = []  # records the store refused (they cannot succeed)
        self._rows: deque[dict[str, Any]] = deque()
        self._ops: deque[tuple[str, Callable[[Any], None]]] = deque()
        self._cond = threading.Condition()
        self._closing = self._ended = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"mlflow-{name}", daemon=True)
        self._thread.start()

    # What the run records (each returns at once).

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        """Metric rows as `metrics.jsonl` has them (`step`, `logged_at` and the values)."""
        with self._cond:
            self._rows.extend(rows)
            self.given_step = max([self.given_step, *(row["step"] for row in rows)])
            self._cond.notify()

    def log_row(self, row: dict[str, Any]) -> None:
        self.log_rows([row])

    def log_artifact(self, uri: str, artifact_path: str | None = None) -> None:
        """A file or directory (local or in object storage) as an artifact of the run."""
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        self._enqueue(
            f"artifact {name}", lambda c: log_artifact_to(c, self.run_id, uri, artifact_path)
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        self._enqueue("tags", lambda c: set_tags(c, self.run_id, tags))

    def call(self, what: str, fn: Callable[[Any, str], None]) -> None:
        """Any other record: `fn(client, run_id)`."""
        self._enqueue(what, lambda c: fn(c, self.run_id))

    def end(self, status: str) -> None:
        """Record the run's end now (`finish` waits for what is queued after it)."""
        self._ended = True
        self._enqueue("end", lambda c: c.set_terminated(self.run_id, status))

    def wait_started(self, timeout: float) -> str | None:
        """The MLflow run's id once the store has it (None if not within `timeout` s)."""
        self._started.wait(timeout)
        return self.run_id

    def finish(self, status: str, wait_s: float | None = None) -> dict[str, Any]:
        """End the run (`FINISHED`, `FAILED` or `KILLED`), wait at most `wait_s` (default
        `target.timeout_s`) for the records still waiting, and say where the run is and
        what was not sent."""
        if not self._ended:
            self.end(status)
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(self.target.timeout_s if wait_s is None else wait_s)
        with self._cond:
            unsent_rows, unsent = len(self._rows), [what for what, _ in self._ops]
        if self.run_id is not None:
            self._save_record()  # how far the metric rows got, for the next launch
        report: dict[str, Any] = {
            "uri": self.target.uri,
            "experiment": self.target.experiment,
            "run_id": self.run_id,
            "browse": self.target.browse,
        }
        if unsent_rows or unsent:
            report["unsent"] = {"metric_rows": unsent_rows, "records": unsent}
            report["error"] = self.error
            logger.warning(
                "MLflow at %s has not taken %d metric row(s) and %s of run %s (%s); the "
                "metric rows are sent again when the run is next launched.",
                self.target.uri, unsent_rows, ", ".join(unsent) or "no other record",
                self.name, self.error,
            )  # fmt: skip
        if self.dropped:
            report["refused"] = self.dropped
        return report

    # The thread.

    def _enqueue(self, what: str, op: Callable[[Any], None]) -> None:
        with self._cond:
            self._ops.append((what, op))
            self._cond.notify()

    def _work(self) -> None:
        client, delay = None, FIRST_RETRY_S
        while True:
            with self._cond:
                if client is not None:  # started: wait for records, end when all are sent
                    while not (self._rows or self._ops or self._closing):
                        self._cond.wait()
                    if not (self._rows or self._ops):
                        return
                rows = [self._rows[i] for i in range(min(ROWS_PER_BATCH, len(self._rows)))]
                what, op = self._ops[0] if self._ops and not rows else ("metric rows", None)
            try:
                if client is None:
                    what = "the run"
                    client = self._start()
                elif op is None:
                    self._send_rows(client, rows)
                    self._done(len(rows), None)
                else:
                    op(client)
                    self._done(0, op)
                delay = FIRST_RETRY_S
                if self.error is not None:
                    logger.warning("MLflow at %s takes records again.", self.target.uri)
                    self.error = None
            except Exception as exc:  # noqa: BLE001 - tracking never stops a run
                if _permanent(exc):
                    logger.warning("MLflow refused %s of run %s: %s", what, self.name, exc)
                    self.dropped.append(f"{what}: {_one_line(exc)}")
                    if client is None:  # no run to record into: everything stays unsent
                        self.error = _one_line(exc)
                        return
                    self._done(len(rows) if op is None else 0, op)
                    continue
                if self.error is None:
                    logger.warning(
                        "MLflow at %s is not taking records (%s); retrying in the background, "
                        "training goes on.", self.target.uri, _one_line(exc),
                    )  # fmt: skip
                self.error = _one_line(exc)
                self._pause(delay)
                delay = min(delay * 2, LAST_RETRY_S)

    def _pause(self, seconds: float) -> None:
        """Wait before retrying; new records do not cut the wait short."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def _done(self, rows: int, op: Callable[[Any], None] | None) -> None:
        with self._cond:
            for _ in range(rows):
                self._rows.popleft()
            if op is not None:
                self._ops.popleft()

    def _start(self) -> Any:
        """Connect, then start the MLflow run or continue the recorded one; log the params."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        client = mlflow_client(self.target.uri)
        experiment = client.get_experiment_by_name(self.target.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    self.target.experiment, artifact_location=self.target.artifact_location
                )
            except MlflowException:  # another run created it meanwhile
                experiment_id = client.get_experiment_by_name(self.target.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = None
        if self._continue:
            try:
                run = client.get_run(self._continue)
            except MlflowException as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise  # the store is unreachable, not the run gone: retried
            if run is not None and run.info.lifecycle_stage == "deleted":
                run = None
        if run is None:
            tags = {**self._tags, **({PARENT_RUN_TAG: self._parent} if self._parent else {})}
            run = client.create_run(experiment_id, tags=tags, run_name=self.name)
            self._continue = run.info.run_id  # a retry of what follows continues this one
            self.logged_step = 0
            logged: dict[str, str] = {}
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            set_tags(client, run.info.run_id, self._tags)
            logged = run.data.params
        run_id = run.info.run_id
        new = {k: v for k, v in self._params.items() if k not in logged}
        changed = {
            f"raygen.changed.{key}": value
            for key, value in self._params.items()
            if key in logged and logged[key] != value
        }
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])
        if changed:  # parameters cannot change in MLflow: a re-run's new values are tags
            set_tags(client, run_id, changed)
        self.run_id = run_id
        self._save_record()
        if self._backlog is not None:
            earlier = [row for row in self._backlog() if row["step"] > self.logged_step]
            self._backlog = None
            with self._cond:
                self._rows.extendleft(reversed(earlier))
        self._started.set()
        return client

    def _send_rows(self, client: Any, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(
                metric_name(key),
                float(value),
                int(row.get("logged_at", time.time()) * 1000),
                row["step"],
            )
            for row in rows
            for key, value in row.items()
            if key not in ("step", "logged_at")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ]
        if metrics:
            client.log_batch(self.run_id, metrics=metrics)
        self.logged_step = max(self.logged_step, max(row["step"] for row in rows))

    def _save_record(self) -> None:
        record = {
            "uri": self.target.uri,
            "experiment": self.target.experiment,
            "run_id": self.run_id,
            "logged_step": self.logged_step,
        }
        try:
            write_text(self.record_uri, json.dumps(record, indent=2))
        except Exception as exc:  # noqa: BLE001 - the run goes on; a resume starts another
            logger.warning("could not write %s: %s", self.record_uri, exc)


def log_artifact_to(client: Any, run_id: str, uri: str, artifact_path: str | None) -> None:
    """A file or a directory, local or in object storage (downloaded first); nothing if
    it is not there."""
    import pyarrow.fs as pafs

    from raygen.cluster.storage import resolve

    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if kind == pafs.FileType.Directory:
        client.log_artifacts(run_id, local_copy(uri), artifact_path or name)
    elif kind == pafs.FileType.File:
        if not is_remote(uri):
            client.log_artifact(run_id, path, artifact_path)
            return
        with tempfile.TemporaryDirectory(prefix="raygen-artifact-") as tmp:
            local = Path(tmp, name)
            pafs.copy_files(path, str(local), source_filesystem=fs)
            client.log_artifact(run_id, str(local), artifact_path)


def set_tags(client: Any, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:MAX_PARAM_CHARS]) for k, v in tags.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + PARAMS_PER_BATCH])


def mlflow_client(uri: str) -> Any:
    """An MLflow client of the store at `uri` (tracking and registry), MLflow set up as
    raygen's library: each HTTP request fails fast (MLflow would retry one for
    minutes; the tracker retries records on its own schedule), and MLflow's usage
    telemetry stays off (its threads would call out from every training driver, on
    clusters that often cannot reach the internet). A user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Creating an embedded store's tables is routine, not news.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _permanent(exc: BaseException) -> bool:
    from raygen.cluster.errors import RaygenError

    return isinstance(exc, RaygenError) or getattr(exc, "error_code", None) in PERMANENT_ERRORS


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]

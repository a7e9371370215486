"""The audit's inference, in Ray Data actors across the cluster: each evaluation row's
loss, each prompt's completion scored, each generated image classified."""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np

from raygen.cluster.storage import local_copy, read_table
from raygen.jobs.errors import SpecError
from raygen.jobs.progress import Counter, Progress
from raygen.jobs.seeding import derive_seed
from raygen.serving.audit.checks import fid_dir
from raygen.serving.spec import AuditSpec, ClassQualityCheck, OutcomeCheck, QualityCheck

logger = logging.getLogger(__name__)


def score_texts(spec: AuditSpec, model: str, progress: Progress) -> Any:
    """The evaluation rows with `loss` (mean token loss) and `completion_<i>` columns."""
    import ray.data

    from raygen.cluster.connection import capacity_problems
    from raygen.cluster.errors import ClusterError

    shortfall = capacity_problems({"CPU": 1}, spec.workers, embedded=True)
    workers = spec.workers if not shortfall else 1
    columns = sorted(
        {spec.text_column, *spec.sensitive_features}
        | ({spec.label_column} if spec.label_column else set())
        | {c.prompt_column for c in spec.checks if isinstance(c, OutcomeCheck)}
    )
    # Evaluation sets are small next to the work on them: read here, and let the actors
    # hold every CPU (tasks queued behind CPU-holding actors would wait forever on a small
    # cluster).
    table = read_table(spec.data, columns)
    if spec.max_rows:
        table = table.slice(0, spec.max_rows)
    # Blocks of one batch each, so every actor gets work (no repartition task needed).
    step = spec.batch_size
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, max(len(table), 1), step)])
    tasks = {
        "loss": any(isinstance(c, QualityCheck) for c in spec.checks),
        "text_column": spec.text_column,
        "max_text_tokens": spec.max_text_tokens,
        "completions": [
            (i, c.prompt_column, c.max_new_tokens, c.temperature, c.seed)
            for i, c in enumerate(spec.checks)
            if isinstance(c, OutcomeCheck)
        ],
    }
    try:
        with progress.stage("score evaluation rows", len(table)) as counter:
            return ds.map_batches(
                _TextScorer,
                fn_constructor_kwargs={"model_dir": model, "tasks": tasks, "counter": counter},
                batch_size=spec.batch_size,
                batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=1,
            ).to_pandas()
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"the audit's inference failed: {exc}") from None


class _TextScorer:
    """A Ray Data actor: the model, scoring batches of evaluation rows."""

    def __init__(self, model_dir: str, tasks: dict[str, Any], counter: Counter):
        import torch

        from raygen.serving.runtimes.text import LanguageModel

        torch.set_num_threads(1)
        self.model = LanguageModel(local_copy(model_dir))
        self.tasks, self.counter = tasks, counter

    def __call__(self, batch: Any) -> Any:
        from raygen.serving.runtimes.text import TextRequest

        tasks = self.tasks
        if tasks["loss"]:
            batch["loss"] = self.model.mean_token_losses(
                list(batch[tasks["text_column"]]), tasks["max_text_tokens"]
            )
        context = self.model.context_length
        chat = self.model.has_chat_template
        for index, column, max_new, temperature, seed in tasks["completions"]:
            requests = []
            for prompt in batch[column]:
                # A chat model is asked as a user asks it: through its template.
                text = self.model.user_turn(str(prompt)) if chat else str(prompt)
                ids = self.model.encode(text)[-(context - max_new) :]
                # Seeded by the prompt itself: the same whatever batch or actor it lands in.
                row_seed = derive_seed(seed, zlib.crc32(str(prompt).encode()))
                requests.append(TextRequest(ids, max_new, temperature, 1.0, [], row_seed))
            texts = [""] * len(requests)
            for deltas in self.model.generate(requests):
                for i, delta in enumerate(deltas):
                    if delta is not None:
                        texts[i] += delta.text
            batch[f"completion_{index}"] = texts
        self.counter.add(len(batch))
        return batch


def classify_samples(
    spec: AuditSpec, check: ClassQualityCheck, model: str, progress: Progress
) -> tuple[np.ndarray, np.ndarray]:
    """Generate `samples_per_class` images of every class across Ray actors and classify
    them with the run's classifier: (asked class, 1 where the classifier agreed)."""
    import ray.data

    from raygen.serving.runtimes.common import detect_kind
    from raygen.serving.runtimes.images import image_model

    facts = image_model(local_copy(model), detect_kind(model))
    if not facts.num_classes:
        raise SpecError("--model", f"{model} is unconditional; class_accuracy needs classes.")
    if check.guidance_scale is not None and not facts.guides:
        raise SpecError(
            "checks",
            f"`guidance_scale`: {model} has no classifier-free guidance (latent diffusion "
            "models do); remove it from the class_accuracy check.",
        )
    classes = facts.num_classes
    items = [
        {"label": k, "index": i} for k in range(classes) for i in range(check.samples_per_class)
    ]
    with progress.stage("generate and classify images", len(items)) as counter:
        table = (
            ray.data.from_items(items)
            .map_batches(
                _ImageClassifier,
                fn_constructor_kwargs={
                    "model_dir": model,
                    "fid_dir": fid_dir(check.classifier),
                    "steps": check.num_inference_steps,
                    "guidance_scale": check.guidance_scale,
                    "seed": check.seed,
                    "counter": counter,
                },
                batch_size=spec.batch_size,
                batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=spec.workers),
                num_cpus=1,
            )
            .to_pandas()
        )
    return table["label"].to_numpy(), table["correct"].to_numpy()


class _ImageClassifier:
    def __init__(
        self,
        model_dir: str,
        fid_dir: str,
        steps: int,
        guidance_scale: float | None,
        seed: int,
        counter: Counter,
    ):
        import torch

        from raygen.jobs.eval.fid import load_extractor
        from raygen.serving.runtimes.common import detect_kind
        from raygen.serving.runtimes.images import image_model

        torch.set_num_threads(1)
        self.model = image_model(local_copy(model_dir), detect_kind(model_dir))
        self.classifier = load_extractor("classifier", local_copy(fid_dir), None).network
        self.steps, self.seed, self.counter = steps, seed, counter
        self.guidance_scale = guidance_scale

    def __call__(self, batch: Any) -> Any:
        import torch

        from raygen.serving.runtimes.images import ImageTask

        images = []
        for label, index in zip(batch["label"], batch["index"], strict=True):
            # Image `index` of class `label`: its own seed, whatever batch it lands in.
            steps = min(self.steps, self.model.num_train_timesteps)  # a GAN: one pass
            seed = derive_seed(self.seed, label, index)
            request = ImageTask(1, steps, seed, int(label), self.guidance_scale)
            images.append(self.model.generate([request])[0][0])
        pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            predicted = self.classifier(pixels).argmax(-1).numpy()
        batch["correct"] = (predicted == batch["label"].to_numpy()).astype(int)
        self.counter.add(len(batch))
        return batch

"""`raygen train`, `raygen export`, `raygen sample`, `raygen generate`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from raygen import render
from raygen.commands.common import AddressOption, SetOption, setup_logging


def train(
    spec: Annotated[Path | None, typer.Argument(help="Train spec (YAML).")] = None,
    set_: SetOption = None,
    address: AddressOption = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start over in a new run dir <name>-<k>.")
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Validate and print the resolved spec; run nothing.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the workers' own logs too.")
    ] = False,
    print_schema: Annotated[
        bool, typer.Option("--print-schema", hidden=True, help="As `raygen schema train`.")
    ] = False,
) -> None:
    """Train a model from a spec with DeepSpeed on Ray Train."""
    from raygen.jobs.loader import dump_spec, load_spec
    from raygen.jobs.spec import TrainSpec

    if print_schema:
        render.out.print_json(json.dumps(TrainSpec.model_json_schema()))
        return
    if spec is None:
        raise typer.BadParameter("give a train spec, e.g. jobs/examples/code-lm-tiny.yaml")
    train_spec = load_spec(TrainSpec, spec, set_)
    setup_logging()
    from raygen.jobs.validate import validate_train_spec

    if check:
        resolved = validate_train_spec(train_spec, str(spec))
        render.out.print(dump_spec(resolved), end="", highlight=False)
        render.err.print(f"{spec}: valid")
        return
    from raygen.jobs.launch import launch

    with render.TrainingProgress(train_spec.train.max_steps) as progress:
        result = launch(
            train_spec,
            str(spec),
            address=address,
            fresh=fresh,
            on_metrics=progress,
            on_data=progress.stages,
            verbose=verbose,
        )
    render.training_summary(result)


def export(
    run_dir: Annotated[str, typer.Argument(help="A training run directory (or s3:// URI).")],
    out_dir: Annotated[str, typer.Option("--out", help="Model directory to write.")],
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", help="Checkpoint dir to export. Default: the run's last."),
    ] = None,
) -> None:
    """Export a checkpoint of a run as a model directory, as training does at its end."""
    from raygen.jobs.export import export_checkpoint, last_checkpoint

    checkpoint = checkpoint or last_checkpoint(run_dir)
    export_checkpoint(run_dir, checkpoint, out_dir)
    render.out.print(f"exported {checkpoint} to {out_dir}")


class Scheduler(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"


def sample(
    model_dir: Annotated[
        str, typer.Argument(help="A diffusion, VAE or GAN run's model/ dir (or s3:// URI).")
    ],
    n: Annotated[int, typer.Option("--n", min=1, max=4096, help="Images to generate.")] = 16,
    steps: Annotated[int, typer.Option("--steps", min=1, max=1000, help="Denoising steps.")] = 50,
    class_label: Annotated[
        int | None,
        typer.Option("--class-label", help="Class of every image (conditional models)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the starting noise.")] = 0,
    scheduler: Annotated[
        Scheduler | None,
        typer.Option("--scheduler", help="Default: the one saved with the model."),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            "--guidance-scale",
            min=1,
            max=100,
            help="Classifier-free guidance of a latent diffusion (DiT) model (default 4).",
        ),
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", help="PNG grid to write.")] = Path(
        "samples.png"
    ),
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Also write each image as a PNG here.")
    ] = None,
) -> None:
    """Generate images with a trained diffusion model or GAN (or decode draws from a VAE's
    prior) and write them as a PNG grid."""
    from raygen.jobs.sampling import image_grid, sample_model, save_png

    name = scheduler.value if scheduler else None
    images, labels = sample_model(model_dir, n, steps, class_label, seed, name, guidance_scale)
    columns = max(labels) + 1 if labels and class_label is None else min(8, n)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(images, columns), out_path, scale=max(1, 512 // (columns * 20)))
    render.out.print(f"wrote {n} samples to {out_path}")
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            suffix = f"_class{labels[i]}" if labels else ""
            save_png(image, out_dir / f"sample_{i:04d}{suffix}.png")
        render.out.print(f"wrote {n} PNGs to {out_dir}")


def generate(
    model_dir: Annotated[str, typer.Argument(help="A language model's model/ dir (or s3:// URI).")],
    prompt: Annotated[str, typer.Option("--prompt", help="The text to continue, or to answer.")],
    chat: Annotated[
        bool,
        typer.Option("--chat", help="Send the prompt as a user turn through the chat template."),
    ] = False,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, max=32768, help="Tokens to generate at most.")
    ] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0, max=2, help="0: greedy.")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed (as the API's `seed`).")] = 0,
) -> None:
    """Generate text with a trained language model, streamed as it comes; sampled and seeded
    as the serving API samples a completion."""
    from raygen.cluster.storage import local_copy
    from raygen.jobs.seeding import derive_seed
    from raygen.serving.runtimes.common import LANGUAGE_MODEL, detect_kind
    from raygen.serving.runtimes.text import LanguageModel, TextRequest

    kind = detect_kind(model_dir)  # a SpecError (exit 2) names what the directory lacks
    if kind != LANGUAGE_MODEL:
        raise typer.BadParameter(f"{model_dir} is a {kind} model; use raygen sample")
    model = LanguageModel(local_copy(model_dir))
    if chat and not model.has_chat_template:
        raise typer.BadParameter(
            f"{model_dir} has no chat template (it was trained on text); leave out --chat"
        )
    text = model.user_turn(prompt) if chat else prompt
    ids = model.encode(text)[-max(1, model.context_length - max_tokens) :]
    request = TextRequest(ids, max_tokens, temperature, 1.0, [], derive_seed(seed, 0))
    for (delta,) in model.generate([request]):
        if delta is not None:
            render.out.print(delta.text, end="", highlight=False, markup=False, soft_wrap=True)
    render.out.print()

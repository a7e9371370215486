"""The train spec: one typed, documented description of a training run.

Cheap to import (pydantic and the standard library only): the CLI validates specs and
exports their JSON Schema without loading torch or Ray.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = {
    "builtin:python-stdlib": "the .py sources of the running Python's standard library",
}
BUILTIN_IMAGES = {
    "builtin:digits": "scikit-learn's 1,797 8x8 handwritten digits, with labels 0-9",
}
UNET_ARCHS = ("unet2d",)
DIT_ARCHS = ("dit",)  # latent diffusion: a diffusion transformer on a VAE's latents
VAE_ARCHS = ("autoencoder_kl",)
GAN_ARCHS = ("dcgan",)
IMAGE_FAMILIES = ("diffusion", "vae", "gan")  # they train on images (the same prepared data)
# Options only one family has, and their defaults in it.
FAMILY_OPTIONS = {
    "vae": {"kl_weight": 1e-3, "reconstruction_loss": "l1"},
    "gan": {"gan_loss": "non_saturating", "r1_gamma": 0.0},
}


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class NoiseSchedulerSpec(Section):
    type: Literal["ddpm", "ddim"] = Field(
        "ddpm",
        description="The diffusers scheduler saved with the model (DDPMPipeline or "
        "DDIMPipeline loads it). Training is the same for both.",
    )
    num_train_timesteps: int = Field(1000, ge=2, description="Diffusion steps in training.")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="Noise schedule (squaredcos_cap_v2 is the cosine schedule)."
    )
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="What the network predicts: the noise, or the velocity v."
    )


class EmaSpec(Section):
    decay: float = Field(
        0.9999,
        gt=0,
        lt=1,
        description="Largest EMA decay; early in training the decay is min(decay, "
        "(1+step)/(10+step)) so the average follows the fast-changing weights.",
    )


class LoraSpec(Section):
    r: int = Field(8, ge=1, le=4096, description="Rank of each low-rank update.")
    alpha: float = Field(
        16, gt=0, description="Scaling numerator: an update is scaled by alpha / r."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get an update: `all-linear` (every linear layer but the "
        "output head) or names matched by PEFT (e.g. [q_proj, v_proj]; for gpt2 [c_attn]).",
    )


class ModelSpec(Section):
    family: Literal["causal-lm", "diffusion", "vae", "gan"] = Field(
        "causal-lm",
        description="Model family. `causal-lm`: a transformers causal language model. "
        "`diffusion`: a diffusers UNet image model with a noise scheduler. `vae`: a "
        "variational autoencoder of images (diffusers AutoencoderKL), on its own or as the "
        "latent space of a latent diffusion model (diffusion with arch dit). `gan`: a "
        "generative adversarial network (generator and discriminator), class-conditional "
        "with labels.",
    )
    arch: str | None = Field(
        None,
        description="Built from scratch from `config`: a transformers architecture "
        "(model_type, e.g. gpt2, llama, mistral) for causal-lm; `unet2d` (diffusers "
        "UNet2DModel, on pixels) or `dit` (diffusers DiTTransformer2DModel, class-conditional, "
        "on the latents of `model.vae`) for diffusion; `autoencoder_kl` (diffusers "
        "AutoencoderKL) for vae; "
        "`dcgan` for gan (config: image_size, channels, latent_dim, base_channels, "
        "num_classes). Exactly one of `arch` and `pretrained`.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the architecture's config class (e.g. n_layer, "
        "hidden_size; for unet2d: sample_size, in_channels, block_out_channels, "
        "layers_per_block, down_block_types, num_class_embeds; for dit: num_layers, "
        "num_attention_heads, attention_head_dim, patch_size, the latent shape being the "
        "VAE's). A language model's "
        "vocabulary size is taken from the tokenizer.",
    )
    pretrained: str | None = Field(
        None,
        description="A directory saved with `save_pretrained` (config + safetensors weights) to "
        "fine-tune; for diffusion, a diffusers pipeline directory (with unet/) or a UNet "
        "directory; for vae, an AutoencoderKL directory or a pipeline with vae/. Exactly one "
        "of `arch` and `pretrained`.",
    )
    vae: str | None = Field(
        None,
        description="Latent diffusion (arch: dit): the VAE whose latents the transformer is "
        "trained on: the `model/` directory of a raygen VAE run, or any diffusers "
        "AutoencoderKL directory (or a pipeline with vae/), local or in a bucket. Images are "
        "encoded once, when the data is prepared; samples are decoded with it, and the "
        "export (a DiTPipeline) holds it.",
    )
    kl_weight: float | None = Field(
        None,
        ge=0,
        description="VAE only (default 0.001): weight of the KL term (the mean over latent "
        "elements of the KL divergence from the unit Gaussian prior) against the "
        "reconstruction loss (a mean over pixels in [-1, 1]). Larger: latents closer to the "
        "prior, so samples decoded from it look more like the data, at some cost in sharpness.",
    )
    reconstruction_loss: Literal["l1", "l2"] | None = Field(
        None,
        description="VAE only (default l1): the reconstruction loss, mean absolute (l1) or "
        "squared (l2) error per pixel.",
    )
    gan_loss: Literal["non_saturating", "hinge"] | None = Field(
        None,
        description="GAN only (default non_saturating): the adversarial loss, the "
        "non-saturating logistic loss of Goodfellow et al. or the hinge loss.",
    )
    r1_gamma: float | None = Field(
        None,
        ge=0,
        description="GAN only (default 0: off): weight of the R1 penalty, gamma/2 times the "
        "discriminator's squared gradient norm on real images (Mescheder et al., 2018).",
    )
    scheduler: NoiseSchedulerSpec | None = Field(
        None, description="Diffusion only: the noise scheduler (default: DDPM, 1000 steps)."
    )
    ema: EmaSpec | None = Field(
        None,
        description="Diffusion and GAN: keep an exponential moving average of the weights "
        "(a GAN's generator's), used for sampling, evaluation and export.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    lora: LoraSpec | None = Field(
        None,
        description="Causal LMs: train low-rank adapters (PEFT's LoRA) instead of the weights, "
        "which stay frozen; only the adapters (and a chat template's new token embeddings) "
        "hold gradients and optimizer state. The export holds the merged model in `model/` "
        "and the adapter in `adapter/`.",
    )

    @model_validator(mode="after")
    def _arch_xor_pretrained(self) -> ModelSpec:
        if (self.arch is None) == (self.pretrained is None):
            raise ValueError(
                "set exactly one of `model.arch` (train from scratch) and `model.pretrained` "
                "(fine-tune a saved model)"
            )
        if self.vae is not None and self.arch not in DIT_ARCHS:
            raise ValueError(
                "`model.vae` is the latent space of a latent diffusion model (model.family: "
                "diffusion, arch: dit); remove it"
            )
        if self.arch in DIT_ARCHS and self.vae is None:
            raise ValueError(
                "`model.vae`: a DiT is trained on a VAE's latents; set model.vae to a VAE "
                "directory (the model/ of a raygen VAE run, or any diffusers AutoencoderKL)"
            )
        if self.pretrained is not None and self.config:
            raise ValueError(
                "`model.config` only applies with `model.arch`; a pretrained model keeps its "
                "own config"
            )
        return self

    @model_validator(mode="after")
    def _family_options(self) -> ModelSpec:
        for family, options in FAMILY_OPTIONS.items():
            for key, default in options.items():
                if self.family == family and getattr(self, key) is None:
                    setattr(self, key, default)
                elif self.family != family and getattr(self, key) is not None:
                    kind = {"vae": "a VAE's", "gan": "a GAN's"}[family]
                    raise ValueError(
                        f"`model.{key}` is {kind} (model.family: {family}); remove it for a "
                        f"{self.family} model"
                    )
        return self


def _one_or_many_schema(schema: dict[str, Any]) -> None:
    """A field read as a list also takes one string (`train: x.parquet` is `[x.parquet]`):
    its JSON Schema says so too."""
    options = schema.pop("anyOf", None) or [
        {"type": schema.pop("type"), "items": schema.pop("items")}
    ]
    schema["anyOf"] = [{"type": "string"}, *options]


class DataSpec(Section):
    train: list[str] = Field(
        json_schema_extra=_one_or_many_schema,
        description="Training data: Parquet files, JSON Lines files (.jsonl) or directories "
        "of either (local, s3://, gs:// or abfs://), data sets written by Hugging Face `datasets` "
        "`save_to_disk` (one split's directory), or a builtin set: `builtin:python-stdlib` "
        "(the standard library's .py sources, text) or `builtin:digits` (8x8 handwritten "
        "digits with labels, images).",
    )
    format: Literal["text", "chat"] = Field(
        "text",
        description="`text`: documents, the loss on every token. `chat`: conversations "
        "(`messages_column`, or `prompt_column` + `response_column`), rendered with the "
        "tokenizer's chat template; see `train.loss_on`.",
    )
    text_column: str = Field("text", description="Column holding the text (format: text).")
    messages_column: str = Field(
        "messages",
        description="format chat: column holding each conversation, a list of "
        "`{role, content}` (roles system, user, assistant; several turns).",
    )
    prompt_column: str | None = Field(
        None,
        description="format chat: instruction pairs instead of conversations: the column of "
        "prompts (read as a user turn); needs `response_column`.",
    )
    response_column: str | None = Field(
        None,
        description="format chat: the column of responses to `prompt_column` (read as the "
        "assistant turn).",
    )
    image_column: str = Field(
        "image",
        description="Diffusion: column holding encoded images (PNG/JPEG bytes, or the "
        "`{bytes, path}` struct of Hugging Face datasets) in Parquet inputs.",
    )
    label_column: str | None = Field(
        None,
        description="Diffusion: integer class-label column for class-conditional training "
        "(builtin:digits brings its own labels).",
    )
    random_flip: bool = Field(
        False, description="Diffusion: flip training images horizontally at random."
    )
    eval: list[str] | None = Field(
        None,
        json_schema_extra=_one_or_many_schema,
        description="Separate evaluation corpus (same forms as `train`).",
    )
    eval_fraction: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Share of training documents held out for evaluation when `eval` is "
        "not given, chosen by a hash of the document so reruns get the same split.",
    )
    seq_len: int = Field(256, ge=8, le=1_048_576, description="Tokens per training sequence.")
    max_bytes: int | None = Field(
        None, gt=0, description="Stop reading the corpus after this many bytes of text (demos)."
    )
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this (characters).")
    max_chars: int | None = Field(
        None, ge=1, description="Drop documents longer than this (characters)."
    )
    collapse_whitespace: bool = Field(
        False,
        description="Collapse runs of spaces/tabs, trailing spaces and blank lines (off for "
        "code, where indentation matters).",
    )
    max_non_printable_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Drop documents whose share of non-printable characters exceeds this.",
    )
    max_repeated_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Drop documents whose share of characters in runs of 10+ identical "
        "characters exceeds this.",
    )
    dedupe: Literal["none", "exact", "near"] = Field(
        "exact",
        description="Remove duplicates: `exact` (same normalized text; for images, the same "
        "pixels after resizing) or `near` (text: exact, then MinHash/LSH near-duplicates at "
        "`near_dup_threshold`).",
    )
    near_dup_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Jaccard similarity (character 5-gram shingles) above which two "
        "documents are near-duplicates.",
    )
    prepared: str | None = Field(
        None,
        description="Where prepared (tokenized, packed) shards go. Default: `<run>/data`.",
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _pairs_come_whole(self) -> DataSpec:
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError(
                "set both `prompt_column` and `response_column` (instruction pairs), or "
                "neither (conversations in `messages_column`)"
            )
        return self

    @field_validator("train")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one Parquet path or builtin corpus")
        return value


class TokenizerTrainSpec(Section):
    vocab_size: int = Field(8192, ge=260, le=1_000_000, description="Vocabulary size of the BPE.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a merge.")


class TokenizerSpec(Section):
    path: str | None = Field(
        None, description="A tokenizer directory saved with `save_pretrained`."
    )
    train: TokenizerTrainSpec | None = Field(
        None,
        description="Train a byte-level BPE on the training corpus; it is saved with the run.",
    )
    chat_template: str | None = Field(
        None,
        description="format chat, for a tokenizer without a chat template (raygen's own BPE, "
        "a base model's): a Jinja template, or `chatml` (the built-in, ChatML-style: its "
        "<|im_start|>/<|im_end|> tokens are added and the embeddings resized). A tokenizer "
        "with its own template keeps it unless this is set.",
    )

    @model_validator(mode="after")
    def _path_xor_train(self) -> TokenizerSpec:
        if self.path is not None and self.train is not None:
            raise ValueError("set at most one of `tokenizer.path` and `tokenizer.train`")
        return self


class GroupWeightingSpec(Section):
    column: str = Field(
        description="Parquet column naming each document's group (e.g. dialect, language); "
        "documents with no value form the group `(missing)`."
    )
    method: Literal["none", "inverse_frequency", "worst_group"] = Field(
        description="`inverse_frequency`: weight each token by 1 / its group's share of the "
        "training tokens, so every group counts equally. `worst_group`: group DRO, the "
        "loss is a mix of the groups' losses that shifts towards the worst ones. `none`: "
        "plain loss; the per-group evaluation losses are still logged."
    )
    step_size: float = Field(
        0.01,
        gt=0,
        description="worst_group: how fast the mix moves to the worst groups (each step "
        "q_g *= exp(step_size x group loss)).",
    )


class TrainSection(Section):
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train for.")
    micro_batch_size: int = Field(
        8, ge=1, description="Sequences (or images) per worker per forward pass."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    d_steps_per_g: int = Field(
        1,
        ge=1,
        le=100,
        description="GANs: discriminator updates (each on its own micro-batch of real images) "
        "before each generator update; a step is one generator update.",
    )
    lr: float = Field(3e-4, gt=0, le=1, description="Peak learning rate.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate as a fraction of `lr` (cosine, linear)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to `lr`.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW weight decay (not applied to biases and norms)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 disables.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision. fp16 needs GPUs."
    )
    eval_every: int = Field(100, ge=1, description="Evaluate every N steps (and at the end).")
    eval_batches: int = Field(
        20, ge=1, description="Micro-batches per worker in each evaluation (caps its cost)."
    )
    checkpoint_every: int = Field(
        200, ge=1, description="Checkpoint every N steps (and at the end)."
    )
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    seed: int = Field(0, ge=0, description="Seed for weights, data order and dropout.")
    loss_on: Literal["assistant", "all"] | None = Field(
        None,
        description="Which tokens the loss counts: `assistant` (format chat's default: only "
        "the assistant's turns, end-of-turn included) or `all` (every token; format text "
        "has no other). Metrics count the tokens counted.",
    )
    group_weighting: GroupWeightingSpec | None = Field(
        None,
        description="Language models: per-token loss weights by a group column of the "
        "Parquet data, so under-represented groups are not served worse; logs "
        "`eval_loss/<group>` and `worst_group_eval_loss` at each evaluation.",
    )


class DeepSpeedSpec(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +parameters sharded."
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="Keep optimizer state (and the step) on the CPU."
    )
    offload_params: Literal["none", "cpu"] = Field(
        "none", description="Keep parameters on the CPU between uses (ZeRO-3 only)."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Deep-merged into the generated DeepSpeed config, for anything not named here.",
    )


class SamplingSpec(Section):
    steps: int = Field(
        50, ge=1, le=1000, description="Diffusion: DDIM denoising steps for evaluation samples."
    )
    grid_images: int = Field(
        16,
        ge=1,
        le=256,
        description="Diffusion: images in each evaluation grid `samples/step_*.png` (fixed "
        "seeds; rounded up to whole rows of classes for class-conditional models).",
    )
    fid_samples: int = Field(
        256,
        ge=0,
        description="Diffusion: images generated for the FID at each evaluation; 0 disables "
        "FID. Use at least the feature dimension (128 for `classifier`).",
    )
    fid_extractor: Literal["auto", "classifier", "inception", "none"] = Field(
        "auto",
        description="Diffusion: FID features. `classifier`: a small CNN trained on the run's "
        "labelled images (stored with the prepared data); `inception`: the TorchScript "
        "Inception at `inception_weights`; `auto`: classifier when the data has labels, "
        "else none.",
    )
    inception_weights: str | None = Field(
        None,
        description="Path of a TorchScript Inception feature extractor (called on (N, 3, H, "
        "W) floats in [0, 255], returning (N, D) features, or (features, (N, K) logits) for "
        "an Inception Score too); never downloaded.",
    )
    guidance_scale: float | None = Field(
        None,
        ge=1,
        le=100,
        description="Latent diffusion (arch: dit): classifier-free guidance of evaluation "
        "samples (1: none; default 4, DiTPipeline's). The transformer learns the "
        "unconditional prediction from the 10% of training labels dropped to the null class.",
    )


ACCELERATOR_SHARE = 0.001  # of a node's `accelerator_type:NAME` resource (1 per node)


def accelerator_resource(name: str) -> str:
    """Ray's resource marking nodes whose GPUs are of type `name`."""
    return f"accelerator_type:{name}"


class ScalingSpec(Section):
    num_workers: int = Field(2, ge=1, description="Training worker processes (one per GPU).")
    use_gpu: bool = Field(False, description="Give each worker one GPU.")
    resources_per_worker: dict[str, float] | None = Field(
        None,
        description="Ray resources per worker, e.g. {CPU: 8, GPU: 1}; a worker's CPUs are "
        "its PyTorch threads. Default: the whole cluster: each CPU worker gets its share of "
        "the CPUs (the most that still places every worker), each GPU worker its node's "
        "CPUs, less one, divided by its GPUs.",
    )
    accelerator_type: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The GPU model every worker needs, as Ray names it (A100, H100, L4, A10G, "
        "V100, T4...): workers run only on nodes of that type (Ray's `accelerator_type:NAME` "
        "resource, which Ray sets on nodes with those GPUs and cluster configs declare for "
        "their node types). Needs use_gpu.",
    )

    def per_worker(self, default_cpus: int = 1) -> dict[str, float]:
        """The Ray resources one worker asks for: `resources_per_worker`, else
        `default_cpus` CPUs (see `raygen.cluster.connection.default_worker_cpus`); plus one
        GPU with `use_gpu` unless it names its own, and a sliver of its accelerator type's
        resource (Ray's convention: any amount places it on such a node)."""
        resources = dict(self.resources_per_worker or {"CPU": default_cpus})
        if self.use_gpu:
            resources.setdefault("GPU", 1)
        if self.accelerator_type:
            resources[accelerator_resource(self.accelerator_type)] = ACCELERATOR_SHARE
        return resources


class RunSpec(Section):
    storage: str = Field(
        "runs", description="Directory (or later URI) under which `<name>/` holds the run."
    )
    max_failures: int = Field(
        3,
        ge=-1,
        description="Worker-group restarts allowed after failures (a crash, a lost node); -1 "
        "is unlimited. A run that fails 3 times in a row at the same point stops anyway.",
    )
    max_preemptions: int = Field(
        -1,
        ge=-1,
        description="Restarts allowed after nodes are preempted (spot reclaims, drains), "
        "counted apart from failures; -1 (the default) is unlimited.",
    )
    preemption_grace_s: float = Field(
        0.0,
        ge=0,
        description="Seconds the workers on healthy nodes may keep running past a "
        "preemption's deadline (to finish uploading the checkpoint taken at the notice).",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept.")


class MlflowSpec(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI: a server (http://host:5000), a database "
        "(sqlite:///path/mlflow.db, postgresql://...) or databricks. Default: "
        "MLFLOW_TRACKING_URI, else a SQLite store `mlflow.db` under run.storage (artifacts "
        "beside it in `mlartifacts/`; under ~/.raygen/mlflow when run.storage is an object "
        "store).",
    )
    experiment: str = Field(
        "raygen", min_length=1, description="Experiment the runs go to (created if missing)."
    )
    timeout_s: float = Field(
        30.0,
        ge=0,
        description="Seconds a finished run waits for records the tracking server has not "
        "taken yet; what is still unsent then is reported (metric rows are sent again by the "
        "run's next launch).",
    )


class TrackingSpec(Section):
    mlflow: MlflowSpec | Literal[False] = Field(
        default_factory=MlflowSpec,
        description="Track the run in MLflow (parameters, metrics, tags, artifacts); false "
        "turns tracking off.",
    )

    @field_validator("mlflow", mode="before")
    @classmethod
    def _true_is_default(cls, value: Any) -> Any:
        return {} if value is True or value is None else value


class RegistrySpec(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=256,
        description="Registered model the exported model becomes a new version of (created "
        "if missing), in the run's MLflow store.",
    )


# Keys a re-run may change and still continue the same run: they only schedule the rest
# (how far to train, how often to log, evaluate and checkpoint, what to keep, how many
# failures to survive) or what evaluation samples. Any other change starts another run.
RESUMABLE_KEYS = (
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "run.keep_checkpoints",
    "run.max_failures",
    "run.max_preemptions",
    "run.preemption_grace_s",
    "sampling.grid_images",
    "sampling.fid_samples",
    "sampling.steps",
)
# Sections a re-run may change in any key: they say where records go, not what trains.
RESUMABLE_SECTIONS = ("tracking", "registry")


def is_resumable(key: str) -> bool:
    """Whether a re-run may change this dotted spec key and continue the same run."""
    return key in RESUMABLE_KEYS or key.split(".", 1)[0] in RESUMABLE_SECTIONS


class TrainSpec(Section):
    """A training run: what to train, on what data, how, and where its outputs go."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        max_length=128,
        description="Run name (letters, digits, `-`, `_`); the run lives in "
        "`<run.storage>/<name>`.",
    )
    model: ModelSpec = Field(description="The network to train.")
    data: DataSpec = Field(description="Training and evaluation corpora.")
    tokenizer: TokenizerSpec = Field(
        default_factory=TokenizerSpec,
        description="The tokenizer. Default: the pretrained model's, else a trained BPE.",
    )
    train: TrainSection = Field(default_factory=TrainSection, description="Optimization.")
    deepspeed: DeepSpeedSpec = Field(
        default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO sharding."
    )
    sampling: SamplingSpec = Field(
        default_factory=SamplingSpec,
        description="Image models: evaluation samples and FID.",
    )
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Workers.")
    run: RunSpec = Field(default_factory=RunSpec, description="Storage and fault tolerance.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment tracking (MLflow)."
    )
    registry: RegistrySpec | None = Field(
        None,
        description="Register the exported model in MLflow's model registry (as a new "
        "version of `name`) when the run completes.",
    )

    @model_validator(mode="after")
    def _registry_needs_tracking(self) -> TrainSpec:
        if self.registry is not None and self.tracking.mlflow is False:
            raise ValueError(
                "`registry` registers the model in the run's MLflow store, but "
                "`tracking.mlflow` is false: turn tracking on, or remove `registry`."
            )
        return self

    @model_validator(mode="after")
    def _loss_on_by_format(self) -> TrainSpec:
        if self.train.loss_on is None and self.model.family == "causal-lm":
            self.train.loss_on = "assistant" if self.data.format == "chat" else "all"
        return self


def global_batch_size(spec: TrainSpec, world_size: int | None = None) -> int:
    """Examples (sequences or images) per optimizer step: micro x accumulation x workers."""
    world = spec.scaling.num_workers if world_size is None else world_size
    return spec.train.micro_batch_size * spec.train.grad_accum * world

"""The training loops (one file per family: lm, diffusion) and what they share: worker
start-up, checkpoints, the DeepSpeed config, metrics."""

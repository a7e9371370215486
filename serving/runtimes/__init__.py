"""Inference runtimes the serving engine drives: `text` (language models, continuous
batching), `images` (diffusion pipelines); `common` tells which a model directory is."""

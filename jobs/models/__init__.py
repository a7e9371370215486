"""Model builders: pure PyTorch / transformers, no Ray, DeepSpeed or torch.distributed."""

"""An exponential moving average of a DeepSpeed-wrapped network's weights, sharded as they
are: the diffusion UNet's and the GAN generator's, for sampling, evaluation and export."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class WeightAverage:
    """Exponential moving average of the weights this rank holds, in fp32.

    Under ZeRO-3 each rank averages only its own partition of each parameter (`ds_tensor`),
    so the average is sharded like the weights; otherwise it averages the full tensors.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = list(module.parameters())
        self.shadow = [self._local(p).detach().float().clone() for p in self.params]

    @staticmethod
    def _local(param: torch.nn.Parameter) -> torch.Tensor:
        # A ZeRO-3 rank's partition lives in ds_tensor (the optimizer updates it there).
        return param.ds_tensor if hasattr(param, "ds_tensor") else param.data

    @staticmethod
    def _kept_whole(param: torch.nn.Parameter) -> bool:
        # ZeRO-3 keeps small ("persistent") parameters gathered between forwards: changing
        # their partition does not change the full copy the forward uses.
        return hasattr(param, "ds_tensor") and param.data.numel() == param.ds_numel

    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.params, strict=True):
                shadow.lerp_(self._local(param).float(), 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the module with the averaged weights inside the block (all ranks together)."""
        import torch.distributed as dist

        backup = [self._local(p).detach().clone() for p in self.params]
        whole = {i: p.data.clone() for i, p in enumerate(self.params) if self._kept_whole(p)}
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.params, strict=True):
                self._local(param).copy_(shadow)
            for i in whole:  # rebuild their full copies from every rank's averaged partition
                param = self.params[i]
                part = self.shadow[i].to(param.ds_tensor.dtype)
                parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, part)
                param.data.copy_(torch.cat(parts)[: param.ds_numel].view(param.ds_shape))
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(backup, self.params, strict=True):
                    self._local(param).copy_(saved)
                for i, saved in whole.items():
                    self.params[i].data.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shapes = [tuple(s.shape) for s in state["shadow"]]
        if shapes != [tuple(s.shape) for s in self.shadow]:
            raise RuntimeError(
                "the checkpoint's EMA shards do not match this worker's parameters (was the "
                "number of workers or the ZeRO stage changed?)"
            )
        self.shadow = [s.to(self.shadow[0].device) for s in state["shadow"]]

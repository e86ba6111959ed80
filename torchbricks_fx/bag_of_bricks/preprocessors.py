"""Input preprocessing as a module (a graph leaf must be an ``nn.Module``, unlike the seed's callable)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from torchbricks_fx.errors import BrickError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessor"]

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


def _values(values: float | Sequence[float] | torch.Tensor) -> tuple[float, ...]:
    """One value or one per channel, as torchvision's ``Normalize`` takes them (a float, a sequence, a tensor)."""
    return tuple(torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist())


class Preprocessor(nn.Module):
    """Normalizes images ``(N, C, H, W)`` per channel: ``(x - mean) / std``, as torchvision's ``Normalize``.

    ``mean`` and ``std`` are one value for every channel (a float) or one per channel; a single value is
    repeated to match the other.  The output keeps the input's float dtype (float16 in, float16 out); float64
    images are normalized with the configured values in float64, not with float32-rounded constants.

    With ``uint8_input=True`` the input must be ``uint8`` in ``[0, 255]`` and is scaled to ``[0, 1]`` first
    (e.g. images straight from a decoder, or an exported model fed raw pixels); any other dtype is a
    ``BrickError``, as are integer images without it.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float | Sequence[float] | torch.Tensor = IMAGENET_MEAN,
                 std: float | Sequence[float] | torch.Tensor = IMAGENET_STD, uint8_input: bool = False) -> None:
        super().__init__()
        means, stds = _values(mean), _values(std)
        if len(means) != len(stds) and 1 not in (len(means), len(stds)):
            raise BrickError(f"Preprocessor: mean {means} and std {stds} need one value per channel, or one value "
                             f"for every channel (got {len(means)} and {len(stds)}).")
        if not means or any(not s > 0 for s in stds):
            raise BrickError(f"Preprocessor: std values must be positive and mean not empty, got mean {means} and "
                             f"std {stds}.")
        channels = max(len(means), len(stds))
        self._exact = means * (channels // len(means)), stds * (channels // len(stds))
        # Non-persistent buffers: they move with .to() and become ONNX constants, but stay out of checkpoints
        # (they are configuration, not learned weights).  float32, not float64: some devices (MPS) have none.
        self.register_buffer("mean", torch.tensor(self._exact[0], dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(self._exact[1], dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.uint8_input = uint8_input

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.uint8_input:
            if images.dtype != torch.uint8:
                # Dividing float images (already in [0, 1]) by 255 again would silently darken them to ~0.
                raise BrickError(f"Preprocessor(uint8_input=True) got {images.dtype} images; pass uint8 pixels "
                                 f"in [0, 255], or build it with Preprocessor(uint8_input=False) for floats in "
                                 f"[0, 1].")
            images = images.to(self.mean.dtype) / 255.0
        elif not images.is_floating_point():
            # Normalizing integer pixels without scaling would silently give values ~255x too large.
            raise BrickError(f"Preprocessor got {images.dtype} images; pass floats in [0, 1] or build it with "
                             f"Preprocessor(uint8_input=True) for uint8 pixels in [0, 255].")
        if images.dim() < 3 or self.mean.shape[0] not in (1, images.shape[-3]):  # one value: every channel
            raise BrickError(f"Preprocessor normalizes {self.mean.shape[0]} channels (mean and std have "
                             f"{self.mean.shape[0]} values), but got images of shape {tuple(images.shape)}; pass "
                             f"(..., channels, height, width) images or one mean and std per channel.")
        if images.dtype == torch.float64:  # the buffers hold float32-rounded values (about 1e-8 off)
            mean = images.new_tensor(self._exact[0]).view(-1, 1, 1)
            std = images.new_tensor(self._exact[1]).view(-1, 1, 1)
            return (images - mean) / std
        # In the input's dtype, as Normalize: float16 images stay float16 (no promotion to the buffers' float32).
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}, uint8_input={self.uint8_input}"

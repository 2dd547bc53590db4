"""How each reference resizes and normalises, reproduced bit for bit, with work that releases the GIL.

Two references exist for InternVL preprocessing and they do NOT produce the same pixels:

- "chat" (original `InternVLChatModel` checkpoints; the model card's `dynamic_preprocess`, vLLM's
  `transformers_utils/processors/internvl.py`): Pillow BICUBIC resize of the RGB image (Pillow's fixed-point,
  8-bit-per-pass resampler), then torchvision `ToTensor` (float32 `x / 255`) and `Normalize`
  (`(x - mean) / std` in float32).
- "hf" (transformers-native `-HF` checkpoints; vLLM's `interns1.py` calls transformers' `InternVLProcessor`,
  whose image processor resolves to the torchvision-backend `GotOcr2ImageProcessor`): torch antialiased bicubic
  interpolation on the uint8 CHW tensor (`torchvision.transforms.v2.functional.resize`, which keeps uint8 on
  CPU), no resize when the size already matches, then one fused float32 step `(x - 255 * mean) / (255 * std)`.

Both resizers (Pillow's resample passes, torch kernels) and numpy's ufuncs release the GIL, which is what lets
`ImagePreprocessor` spread this work over threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Style = Literal["chat", "hf"]
_PIXEL_MAX_F32 = np.float32(255)


class Resampler(Protocol):
    """Resizes one decoded image; `source` is prepared once per image and shared by its canvas and thumbnail."""

    def prepare(self, image: Image.Image) -> object: ...

    def resize(self, source: object, width: int, height: int) -> np.ndarray:
        """`[height, width, 3]` uint8 (possibly a strided view) of `source` resized to `width x height`."""
        ...


class PillowBicubic:
    """Pillow `Image.resize(..., BICUBIC)` on the RGB image: the chat-format reference."""

    def prepare(self, image: Image.Image) -> Image.Image:
        return image

    def resize(self, source: Image.Image, width: int, height: int) -> np.ndarray:
        if source.size == (width, height):
            return np.asarray(source)
        return np.asarray(source.resize((width, height), Image.Resampling.BICUBIC))


class TorchAntialiasedBicubic:
    """Antialiased bicubic `interpolate` on the uint8 tensor, as torchvision's v2 resize runs it on CPU."""

    def prepare(self, image: Image.Image) -> torch.Tensor:
        # pixels: [1, 3, h, w] uint8 in channels_last memory, i.e. Pillow's HWC buffer as is. torch's kernel
        # gives the same values for every layout and runs about twice as fast on this one.
        return torch.from_numpy(np.array(image)).unsqueeze(0).permute(0, 3, 1, 2)

    def resize(self, source: torch.Tensor, width: int, height: int) -> np.ndarray:
        if tuple(source.shape[-2:]) != (height, width):
            source = F.interpolate(
                source, size=(height, width), mode="bicubic", align_corners=False, antialias=True
            )
        return source[0].permute(1, 2, 0).numpy()


@dataclass(frozen=True, slots=True)
class TileNormaliser:
    """uint8 CHW tile -> float32 CHW, in the reference's exact order of float32 operations."""

    rescale_first: bool  # chat: x / 255 first; hf: the rescale is folded into offset and divisor
    offset: np.ndarray  # [3] float32
    divisor: np.ndarray  # [3] float32

    @classmethod
    def for_style(cls, style: Style, mean: tuple[float, ...], std: tuple[float, ...]) -> "TileNormaliser":
        mean_f32 = np.asarray(mean, dtype=np.float32)
        std_f32 = np.asarray(std, dtype=np.float32)
        if style == "chat":
            return cls(rescale_first=True, offset=mean_f32, divisor=std_f32)
        # transformers multiplies mean and std by 1 / rescale_factor = 255 in float32
        return cls(rescale_first=False, offset=mean_f32 * _PIXEL_MAX_F32, divisor=std_f32 * _PIXEL_MAX_F32)

    def __call__(self, tile: np.ndarray, out: np.ndarray) -> None:
        """Write the normalised `tile` ([3, s, s] uint8, any strides) into `out` ([3, s, s] float32)."""
        for channel in range(3):  # one [s, s] plane at a time stays in cache across the in-place passes
            plane = out[channel]
            np.copyto(plane, tile[channel], casting="unsafe")  # uint8 -> float32 is exact
            if self.rescale_first:
                plane /= _PIXEL_MAX_F32
            plane -= self.offset[channel]
            plane /= self.divisor[channel]


def resampler_for(style: Style) -> Resampler:
    return PillowBicubic() if style == "chat" else TorchAntialiasedBicubic()

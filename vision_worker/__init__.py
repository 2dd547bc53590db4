"""Vision service: image fetch/decode, InternVL dynamic tiling, InternViT encoding, ViR routing, projectors."""

from dvd_serve.common.torch_compat import ensure_torchvision_importable

# transformers' image processors (the reference for the hf checkpoint format) import torchvision.
ensure_torchvision_importable()

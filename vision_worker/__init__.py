"""Vision service: image fetch/decode, InternVL dynamic tiling, InternViT encoding, ViR routing, projectors."""

"""Language service: a language-only vLLM engine fed with visual embeddings received over gRPC."""

from dvd_serve.common.torch_compat import ensure_torchvision_importable

# vLLM imports transformers' image utilities, which import torchvision: make that work before any vLLM import.
ensure_torchvision_importable()

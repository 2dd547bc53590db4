"""OpenAI-compatible gateway (FastAPI) and the `dvd-serve` command line."""

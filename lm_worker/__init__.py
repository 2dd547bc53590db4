"""Language service: a language-only vLLM engine fed with visual embeddings received over gRPC."""

"""Version 1 of the EmbeddingSink contract: `embeddings.proto` and its generated stubs (do not edit those)."""

"""Versioned gRPC contract between the vision and language services (`v1/`), its generated stubs, and the framing,
codec, channel options and status mapping both edges share. See proto/README.md."""

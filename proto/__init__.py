"""Versioned gRPC contract between the vision and language services, and its generated stubs."""

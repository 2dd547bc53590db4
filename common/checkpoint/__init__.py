"""InternVL3.5 checkpoint formats: reading either layout, and generating random-weight checkpoints."""

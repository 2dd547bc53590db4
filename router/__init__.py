"""ViR, the InternVL3.5-Flash Visual Resolution Router, as plain torch (no Ray, no protobuf)."""

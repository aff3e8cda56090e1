"""The `generate` stage."""

"""The `verify` stage."""

"""Test doubles for users and the test suite: `testing.server`, a fake OpenAI-compatible server over a
local model (or none). Never imported by the pipeline itself (an import-linter contract)."""

"""Helpers for nestor's end-to-end tests (real agent-server, real SDK, fake LLM)."""

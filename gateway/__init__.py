"""The public, OpenAI-compatible API: one URL in front of the prefill and decode workers."""

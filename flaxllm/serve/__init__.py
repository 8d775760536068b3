"""Serving: an OpenAI-compatible HTTP server (`flaxllm serve`) over an engine with continuous
batching. `engine` (slots, prefill, insert, decode, the scheduler), `api` (the FastAPI app),
`tokens` (text, tokens and the chat template), `command` (the command line, model loading)."""

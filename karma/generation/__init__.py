"""Completions from the user's own model pool: prompts, engines (hf, vllm, openai), generate."""

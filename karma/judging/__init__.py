"""Judging pool completions: a reward model or an LLM judge, as UltraFeedback records."""

"""The ``openai`` engine: any OpenAI-compatible chat server (``vllm serve``, sglang, llama.cpp
server, a hosted API), through the standard library's HTTP client.

Requests run ``generate.concurrency`` at a time; a 429, a 5xx, a timeout or a dropped
connection is retried ``generate.retries`` times with exponential backoff, then the row is
marked failed (kept, never dropped). The API key is read from the environment variable
``generate.api_key_env`` and never written anywhere; a server on this machine needs none.
Before the first request the server must answer ``GET /models`` (an unreachable server is one
line, not a run of failed rows).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from karma import __version__
from karma.core.errors import KarmaError
from karma.generation.completion import Chat, Completion, failed, trim_stop
from karma.generation.settings import GenerateConfig, PoolModel

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class Retryable(Exception):
    """A failure worth another try (429, 5xx, timeout, connection)."""


def api_key(cfg: GenerateConfig) -> str | None:
    """The key from ``cfg.api_key_env``; required unless the server is on this machine."""
    key = os.environ.get(cfg.api_key_env)
    host = urllib.parse.urlparse(cfg.base_url).hostname or ""
    if not key and host not in LOCAL_HOSTS:
        raise KarmaError(
            f"missing API key: environment variable {cfg.api_key_env} is not set",
            field="generate.api_key_env",
            value=cfg.api_key_env,
            expected="the key in that variable (keys are never read from params)",
        )
    return key or None


class OpenAIEngine:
    """Chat completions from an OpenAI-compatible server."""

    name = "openai"

    def __init__(self, entry: PoolModel, cfg: GenerateConfig, where: str = "scores.measured"):
        if not cfg.base_url.startswith(("http://", "https://")):
            raise KarmaError("not an http(s) URL", field="generate.base_url", value=cfg.base_url)
        self.cfg = cfg
        self.model = entry.model
        self.key = api_key(cfg)
        self.url = cfg.base_url.rstrip("/")
        self.version = f"openai-compatible ({self._probe()}), karma {__version__}"
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="openai")

    def _headers(self) -> dict[str, str]:
        head = {"Content-Type": "application/json"}
        if self.key:
            head["Authorization"] = f"Bearer {self.key}"
        return head

    def _probe(self) -> str:
        """``GET /models``: the server answers, else one line naming the URL."""
        req = urllib.request.Request(f"{self.url}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=min(self.cfg.timeout, 10)) as resp:
                return str(resp.headers.get("Server") or "server")
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise KarmaError(
                    f"the server refused the API key (HTTP {err.code})",
                    field="generate.api_key_env",
                    value=self.cfg.api_key_env,
                ) from None
            return "server"  # /models missing is fine: chat completions may still work
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise KarmaError(
                f"server unreachable: {reason}",
                field="generate.base_url",
                value=self.cfg.base_url,
                expected="a running server",
            ) from None

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}/chat/completions", data=data, headers=self._headers(), method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            if err.code in RETRY_STATUS:
                raise Retryable(f"HTTP {err.code}") from None
            raise KarmaError(f"HTTP {err.code}: {err.read()[:200]!r}") from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as err:
            raise Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None

    def _one(self, chat: Chat, seed: int) -> list[Completion]:
        c = self.cfg
        body: dict[str, Any] = {
            "model": self.model,
            "messages": chat,
            "max_tokens": c.max_new_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "n": c.n,
            "seed": seed,
            "logprobs": True,
        }
        if c.stop:
            body["stop"] = list(c.stop)
        delay, reason = c.backoff, ""
        for attempt in range(c.retries + 1):
            try:
                return [self._choice(ch) for ch in self._post(body)["choices"]][: c.n]
            except Retryable as err:
                reason = str(err)
                if attempt < c.retries:
                    log.debug("retry %d after %s", attempt + 1, reason)
                    time.sleep(delay)
                    delay *= 2
            except (KarmaError, KeyError, TypeError, ValueError) as err:
                reason = str(err)
                break
        return [failed(reason)] * c.n

    def _choice(self, choice: dict[str, Any]) -> Completion:
        text = (choice.get("message") or {}).get("content") or ""
        text, stopped = trim_stop(text, self.cfg.stop)
        lps = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
        total = float(sum(lps)) if lps else None
        reason = str(choice.get("finish_reason") or ("stop" if stopped else "length"))
        tokens = len(lps)
        return Completion(text.strip(), tokens, total, total / tokens if tokens else None, reason)

    def generate(self, chats: Sequence[Chat], seed: int) -> list[list[Completion]]:
        futures = [self.pool.submit(self._one, chat, seed + i) for i, chat in enumerate(chats)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=True)

"""The OpenAI API shapes the server speaks: requests (pydantic, unknown fields ignored, as
vLLM does, so clients that send newer fields keep working) and response/chunk builders.

Extensions: ``top_k``, ``min_p``, ``repetition_penalty`` (sampling, as vLLM) and ``moe`` (true: per-token experts in streamed chunks and
``usage.moe`` with tokens per expert per MoE layer), both ignored by other servers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None  # extension; None, 0 or -1 = off (vLLM's convention)
    min_p: float | None = None  # extension (vLLM's)
    repetition_penalty: float | None = None  # extension (vLLM's)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    moe: bool = False  # extension: routing telemetry in chunks and usage

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions


class ChatMessage(_Lenient):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        """The message's text; content parts of type "text" are joined (images are not supported)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape, which every client parses into its typed exceptions."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ResponseShape:
    """Builds the JSON of one response or stream for ``kind`` "chat" or "completion"."""

    def __init__(self, kind: Literal["chat", "completion"], model: str):
        self.kind, self.model = kind, model
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              experts: list[list[int]] | None = None, with_usage_field: bool = False) -> dict:
        """One streamed chunk; ``text`` None makes the content-less last chunk of a chat."""
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text is not None and not role:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = {**self._head("text_completion"), "choices": [choice]}
        if experts is not None:
            choice["moe"] = {"experts": experts}  # [L][K]: the experts that produced this token
        if with_usage_field:
            body["usage"] = None  # OpenAI sends usage: null on every chunk but the usage chunk
        return body

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}


__all__ = ["CompletionRequest", "ChatRequest", "ChatMessage", "StreamOptions", "ResponseShape",
           "error_body", "new_id"]

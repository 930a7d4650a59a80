"""LLM providers for the example: the protocol a client implements, and an offline one.

The example's LLM stages never import a client. They call ``context.provider``, which
is anything with this method::

    async def complete(self, prompt: str, *, model: str, payload: Any) -> Completion

``payload`` is the structured input of the request (pydantic models, dicts, lists):
a real client serialises it to JSON after the prompt and asks for a JSON answer;
``Completion.text`` is that answer, which the stage validates into its output model.

Plugging in a real client is one small class, for example::

    class AnthropicProvider:
        def __init__(self) -> None:
            self.client = anthropic.AsyncAnthropic()

        async def complete(self, prompt: str, *, model: str, payload: Any) -> Completion:
            body = json.dumps(to_jsonable(payload))
            reply = await self.client.messages.create(
                model=model,
                max_tokens=4096,
                messages=[{"role": "user", "content": f"{prompt}\\n\\nInput:\\n{body}"}],
            )
            return Completion(
                text=reply.content[0].text,
                model=model,
                input_tokens=reply.usage.input_tokens,
                output_tokens=reply.usage.output_tokens,
            )

    pipeline, context = sequencer.pipeline(provider=AnthropicProvider())

The provider is a context service, not stage configuration, so swapping it does not
invalidate the cache; the model name is configuration, so changing it does.

``OfflineProvider`` is what the example ships with: nothing reaches the network.
Its answers are computed by a *responder* for the request's task (the payload's
``"task"`` entry), from the request and a random generator seeded with a hash of
``(model, prompt, payload)``: the same request always gets the same answer, and an
edited prompt gets a different one, as it would from a real model.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import anyio
import xxhash
from pydantic import BaseModel, ConfigDict

__all__ = ["Completion", "LLMProvider", "OfflineProvider", "Responder", "to_jsonable"]


class Completion(BaseModel):
    """One answer of a provider: its text (JSON for the example's stages) and usage."""

    model_config = ConfigDict(frozen=True)

    text: str
    model: str
    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@runtime_checkable
class LLMProvider(Protocol):
    """What an LLM stage needs from ``context.provider``."""

    async def complete(self, prompt: str, *, model: str, payload: Any) -> Completion:
        """Answer ``prompt`` about ``payload`` with ``model``; the answer is JSON text."""
        ...


#: Computes an offline answer: ``(prompt, request, rng) -> answer`` (a model or JSON-able).
Responder = Callable[[str, Any, random.Random], Any]


def to_jsonable(value: Any) -> Any:
    """``payload`` as plain JSON data: pydantic models are dumped, tuples become lists."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def _tokens(text: str) -> int:
    """A rough token count: about four characters per token, as for English and JSON."""
    return max(1, (len(text) + 3) // 4)


class OfflineProvider:
    """A deterministic stand-in for an LLM API, for examples, tests and offline work.

    Args:
        responders: One function per task name; the request's ``payload["task"]``
            picks it, and ``payload["input"]`` is what it receives.
        latency_s: ``(min, max)`` simulated latency in seconds, chosen per request
            from its hash (so it is deterministic too).

    ``calls`` counts the requests answered, per task: tests use it to see which
    stages (and which FAN_OUT items) really ran.
    """

    def __init__(
        self,
        responders: Mapping[str, Responder],
        *,
        latency_s: tuple[float, float] = (0.02, 0.05),
    ) -> None:
        self.responders = dict(responders)
        self.latency_s = latency_s
        self.calls: collections.Counter[str] = collections.Counter()

    async def complete(self, prompt: str, *, model: str, payload: Any) -> Completion:
        data = to_jsonable(payload)
        if not isinstance(data, dict) or data.get("task") not in self.responders:
            known = ", ".join(sorted(self.responders))
            raise ValueError(
                f"OfflineProvider answers payloads of the form {{'task': <one of {known}>, "
                f"'input': ...}}; got {str(data)[:80]!r}"
            )
        task: str = data["task"]
        request = json.dumps(data, sort_keys=True, separators=(",", ":"))
        seed = xxhash.xxh3_64_intdigest(f"{model}\x00{prompt}\x00{request}".encode())
        rng = random.Random(seed)
        low, high = self.latency_s
        await anyio.sleep(low + (high - low) * rng.random())
        answer = self.responders[task](prompt, data.get("input"), rng)
        text = json.dumps(to_jsonable(answer), sort_keys=True)
        self.calls[task] += 1
        return Completion(
            text=text,
            model=model,
            input_tokens=_tokens(prompt) + _tokens(request),
            output_tokens=_tokens(text),
        )

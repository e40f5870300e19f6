"""`python -m trainer.serve`: an HTTP sampling service with a small web page (aiohttp).

    python -m trainer.serve --job-dir job/NAME [--port 8080] [--host 127.0.0.1] [--best]

- `POST /v1/completions`: OpenAI's completions API, so any OpenAI client, notebook or UI can use
  the model by changing its base URL to `http://HOST:PORT/v1`. Parameters: `model`, `prompt`
  (a string or a list of strings), `max_tokens` (default 16, in the model's tokens), `temperature`,
  `top_p`, `n`, `stream`, `stream_options.include_usage`, `seed`, `stop` (up to 4 strings),
  `echo`, and verne's extensions `top_k`, `sample_mode` and `no_unk`. Choices are ordered prompt
  by prompt, `n` per prompt; `finish_reason` is "stop" (a stop string came; it is not in the
  text) or "length"; `usage` counts the model's tokens. `stream: true` answers
  `text/event-stream`: `data: {...}` chunks as tokens are generated, then `data: [DONE]`; the
  service stops generating when the client goes away. Errors are OpenAI's error object.
- `GET /v1/models`, `GET /v1/models/ID`: the one model served (its id is the job dir's name).
- `GET /?prime=The&n=200&sample_mode=2` -> the sample as plain text (char-rnn-tensorflow's
  service); also `temperature`, `top_k`, `top_p`, `seed`, `length` (= `n`).
- `POST /v1/generate` with JSON {prime, length, temperature, sample_mode, top_k, top_p, seed,
  num_samples, no_unk} (all optional) -> {"samples": [...], "seed": S, ...}.
- `GET /healthz` -> {"status": "ok", "generated_tokens": N, ...}; `GET /ui` -> a page that streams
  generated text with every sampling control and the model's facts (it works without JavaScript
  too, then showing the text once done).

Requests outside the bounds (length, temperature, prime length, samples, body size) get HTTP 400
with a message. The model runs on one worker thread, so concurrent requests queue and each gets
exactly what it would get alone (same seed, same text); streams take turns a block of tokens at a
time. Without a seed a request gets a random one, reported back. Binds to 127.0.0.1 unless
--host says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import json
import math
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from absl import app, flags, logging
from aiohttp import web

from trainer.errors import UsageError, run_cli
from trainer.sampling import STREAM_CHUNK, SamplingOptions, TextGenerator

# Tokens per compiled call while streaming over HTTP: the first call makes HTTP_FIRST_CHUNK, so
# text reaches the client at once, and each call doubles it up to STREAM_CHUNK, because a call
# has a fixed cost: measured with a 2x32 LSTM, 2,000 tokens took 0.7-1.1 s in one call, 1.4-2.4 s
# streamed in calls of 4, 0.95-1.2 s streamed so (the first text after 6-9 ms).
HTTP_FIRST_CHUNK = 4
# OpenAI's own limit on stop strings.
MAX_STOPS = 4
# (choice index, text, finish_reason or None): what a completion stream is made of.
Event = tuple[int, str, str | None]


@dataclasses.dataclass(frozen=True)
class Limits:
    max_length: int = 2000
    max_prime_chars: int = 2000
    max_samples: int = 8
    max_temperature: float = 5.0
    max_body_bytes: int = 16384


class BadRequest(ValueError):
    """A request outside the bounds or malformed; the message goes back with HTTP 400 (the
    OpenAI endpoints also name the offending `param`, and a `code` where OpenAI has one)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prime: str
    length: int
    num_samples: int
    options: SamplingOptions


_DEFAULTS = {"prime": "", "length": 200, "temperature": 1.0, "sample_mode": 1, "top_k": 0,
             "top_p": 1.0, "num_samples": 1, "no_unk": False}


def _random_seed() -> int:
    return random.randrange(2**31)


def parse_request(values: Mapping[str, Any], limits: Limits,
                  random_seed: Callable[[], int] = _random_seed) -> GenerationRequest:
    """Validates request values (query strings or JSON) against `limits`; raises BadRequest."""
    unknown = sorted(set(values) - set(_DEFAULTS) - {"n", "seed"})
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted([*_DEFAULTS, 'n', 'seed']))}")
    merged = {**_DEFAULTS, **values}
    if "n" in values:  # char-rnn-tensorflow's name for the length
        merged["length"] = values["n"]
    prime = _prime(merged["prime"], "prime", limits)
    length = _number(merged, "length", int, 1, limits.max_length)
    num_samples = _number(merged, "num_samples", int, 1, limits.max_samples)
    return GenerationRequest(prime, length, num_samples, _options(merged, values.get("seed"), limits,
                                                                  random_seed))


def _prime(prime: Any, name: str, limits: Limits) -> str:
    if not isinstance(prime, str):
        raise BadRequest(f"{name} must be a string", param=name)
    if len(prime) > limits.max_prime_chars:
        raise BadRequest(f"{name} has {len(prime)} characters; the limit is {limits.max_prime_chars}",
                         param=name)
    return prime


def _options(values: Mapping[str, Any], seed: Any, limits: Limits,
             random_seed: Callable[[], int]) -> SamplingOptions:
    """The sampling options both APIs share (`values` holds every one, defaults filled in)."""
    temperature = _number(values, "temperature", float, 0.0, limits.max_temperature)
    seed = random_seed() if seed in (None, "") else _number({"seed": seed}, "seed", int, 0, 2**63 - 1)
    try:
        return SamplingOptions(
            temperature=temperature, sample_mode=_number(values, "sample_mode", int, 0, 2),
            top_k=_number(values, "top_k", int, 0, 10**9), top_p=_number(values, "top_p", float, 0.0, 1.0),
            seed=seed, no_unk=_boolean(values["no_unk"], "no_unk")).validate()
    except ValueError as err:
        raise BadRequest(str(err).replace("--", ""), param=str(err).partition("=")[0][2:] or None) from None


def _number(values: Mapping[str, Any], name: str, kind: type, low: float, high: float) -> Any:
    value = values[name]
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise BadRequest(f"{name} must be {what}, got {value!r}", param=name) from None
    if not low <= number <= high:
        raise BadRequest(f"{name}={number} is out of range [{low}, {high}]", param=name)
    return number


def _boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("", "0", "false", "no", "off"):
        return False
    raise BadRequest(f"{name} must be true or false, got {value!r}", param=name)


# --------------------------------------------------------------------------- OpenAI completions


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str]
    max_tokens: int
    n: int
    options: SamplingOptions
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


_COMPLETION_DEFAULTS = {"prompt": "", "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "n": 1,
                        "stream": False, "echo": False, "top_k": 0, "sample_mode": 1, "no_unk": False}
# OpenAI parameters accepted only with the values that leave the result unchanged: verne has no
# log probabilities or penalties to offer, and saying so beats silently ignoring them.
_NEUTRAL = {"logprobs": (0,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
            "suffix": ("",)}
_COMPLETION_PARAMS = {*_COMPLETION_DEFAULTS, *_NEUTRAL, "model", "seed", "stop", "stream_options",
                      "best_of", "user"}


def parse_completion(body: Mapping[str, Any], limits: Limits, model_id: str,
                     random_seed: Callable[[], int] = _random_seed) -> CompletionRequest:
    """Validates an OpenAI completions request against `limits`; raises BadRequest.

    null means the default, as in OpenAI's API; `max_tokens` defaults to 16, as there.
    """
    unknown = sorted(set(body) - _COMPLETION_PARAMS)
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(_COMPLETION_PARAMS))}", param=unknown[0])
    given = {name: value for name, value in body.items() if value is not None}
    model = given.get("model", model_id)
    if model != model_id:
        raise BadRequest(f"model {model!r} is not served here; this service serves {model_id!r} "
                         "(GET /v1/models)", param="model", code="model_not_found", status=404)
    values = {**_COMPLETION_DEFAULTS, **given}
    prompts = _prompts(values["prompt"], limits)
    n = _number(values, "n", int, 1, limits.max_samples)
    if len(prompts) * n > limits.max_samples:
        raise BadRequest(f"{len(prompts)} prompt(s) x n={n} ask for {len(prompts) * n} completions; "
                         f"the limit is {limits.max_samples}", param="n")
    best_of = given.get("best_of", n)
    if best_of not in (1, n):
        raise BadRequest("best_of is not supported (it needs log probabilities); leave it out and "
                         "use n", param="best_of")
    for name, neutral in _NEUTRAL.items():
        if name in given and given[name] not in neutral:
            raise BadRequest(f"{name} is not supported by this service; leave it out", param=name)
    stream = _boolean(values["stream"], "stream")
    return CompletionRequest(
        prompts=prompts, max_tokens=_number(values, "max_tokens", int, 1, limits.max_length), n=n,
        options=_options(values, given.get("seed"), limits, random_seed), stop=_stops(given.get("stop")),
        stream=stream, include_usage=_include_usage(given.get("stream_options"), stream),
        echo=_boolean(values["echo"], "echo"))


def _prompts(prompt: Any, limits: Limits) -> list[str]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [_prime(p, "prompt", limits) for p in prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int | list) for p in prompt):
        raise BadRequest("prompt as token ids is not supported; send the text", param="prompt")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string or a non-empty list of strings", param="prompt")
    return [_prime(prompt, "prompt", limits)]


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOPS):
        raise BadRequest(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them",
                         param="stop")
    return tuple(stops)


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise BadRequest("stream_options is only allowed with stream: true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise BadRequest('stream_options must be {"include_usage": true|false}', param="stream_options")
    return _boolean(options.get("include_usage", False), "stream_options.include_usage")


class _Choice:
    """One completion as its tokens come: cut before the first stop string, and with the end
    that could still become a stop string held back, so streamed text never needs taking back."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.longest = stops, max(map(len, stops), default=0)
        self.text, self.sent, self.tokens = "", 0, 0
        self.finish: str | None = None

    def push(self, pieces: list[str]) -> str:
        """Takes the text of each new token; returns what can be sent now."""
        for piece in pieces:
            if self.finish:
                break
            self.tokens += 1
            start = max(self.sent, len(self.text) - self.longest + 1)
            self.text += piece
            hits = [i for stop in self.stops if (i := self.text.find(stop, start)) >= 0]
            if hits:
                self.text, self.finish = self.text[:min(hits)], "stop"
        return self._release(len(self.text) if self.finish else len(self.text) - self._held())

    def end(self) -> str:
        """What is left to send once generation is over."""
        self.finish = self.finish or "length"
        return self._release(len(self.text))

    def _held(self) -> int:
        for k in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            if any(stop.startswith(self.text[-k:]) for stop in self.stops):
                return k
        return 0

    def _release(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


@dataclasses.dataclass
class Usage:
    """OpenAI's usage counts, in the model's tokens (characters, bytes, words or pieces)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Service:
    """The model behind one worker thread: TF models are not safe to call from many threads."""

    def __init__(self, generator: TextGenerator, limits: Limits, description: dict[str, Any]) -> None:
        self.generator, self.limits, self.description = generator, limits, description
        self.model_id = str(description.get("model") or "verne")
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.generated_tokens = 0  # every token made, for /healthz (and tests that watch a stop)

    async def generate(self, request: GenerationRequest) -> list[str]:
        loop = asyncio.get_running_loop()
        texts = await loop.run_in_executor(
            self.executor, self.generator.generate, request.prime, request.length, request.options,
            request.num_samples)
        self.generated_tokens += request.length * request.num_samples
        return texts

    async def complete(self, request: CompletionRequest, usage: Usage,
                       gone: Callable[[], bool] = lambda: False) -> AsyncIterator[Event]:
        """(choice index, text, finish_reason or None) as the text is generated.

        Each prompt's n completions are one batch, generated a block of tokens per call of the
        worker thread, so other requests take turns in between. Generation stops once every
        completion met a stop string, and as soon as `gone()` says the client left.
        """
        loop = asyncio.get_running_loop()
        # Several calls when text must flow or may stop early; else one.
        chunk = STREAM_CHUNK if request.stream or request.stop else request.max_tokens
        first_chunk = HTTP_FIRST_CHUNK if request.stream else None
        for p, prompt in enumerate(request.prompts):
            first = p * request.n
            ids = self.generator.encode_prime(prompt).ids
            usage.prompt_tokens += len(ids)
            choices = [_Choice(request.stop) for _ in range(request.n)]
            if request.echo:
                for i in range(request.n):
                    yield first + i, prompt, None
            blocks: Iterator[list[list[str]]] = self.generator.stream_tokens(
                ids, request.max_tokens, request.options, request.n, chunk, first_chunk)
            try:
                while not all(choice.finish for choice in choices):
                    if gone():
                        logging.info("client went away: stopped after %d tokens",
                                     sum(c.tokens for c in choices))
                        return
                    block = await loop.run_in_executor(self.executor, next, blocks, None)
                    if block is None:
                        break
                    self.generated_tokens += sum(len(row) for row in block)
                    for i, (choice, pieces) in enumerate(zip(choices, block, strict=True)):
                        text = choice.push(pieces)
                        if text:
                            yield first + i, text, None
            finally:
                # On the worker thread: after any call of `blocks` still running there.
                await loop.run_in_executor(self.executor, blocks.close)
            for i, choice in enumerate(choices):
                usage.completion_tokens += choice.tokens
                yield first + i, choice.end(), choice.finish

    def warm_up(self) -> None:
        """Traces the compiled functions before the first request arrives."""
        self.generator.generate("", 2, SamplingOptions(), 1)


SERVICE = web.AppKey("service", Service)


async def plain_text(request: web.Request) -> web.Response:
    try:
        parsed = parse_request(dict(request.query), request.app[SERVICE].limits)
    except BadRequest as err:
        return web.Response(status=400, text=f"error: {err}\n")
    samples = await request.app[SERVICE].generate(parsed)
    return web.Response(text="\n\n".join(samples), headers={"X-Seed": str(parsed.options.seed)})


async def generate_json(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        body = await _json_body(request, service.limits)
        parsed = parse_request(body, service.limits)
    except BadRequest as err:
        return web.json_response({"error": str(err)}, status=400)
    samples = await service.generate(parsed)
    return web.json_response({
        "samples": samples, "seed": parsed.options.seed, "length": parsed.length,
        "temperature": parsed.options.temperature, "sample_mode": parsed.options.sample_mode,
        "model": service.description})


def openai_error(err: BadRequest) -> web.Response:
    """OpenAI's error object, which its clients turn into their own exceptions."""
    return web.json_response({"error": {"message": str(err), "type": "invalid_request_error",
                                        "param": err.param, "code": err.code}}, status=err.status)


async def completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    try:
        parsed = parse_completion(await _json_body(request, service.limits), service.limits,
                                  service.model_id)
    except BadRequest as err:
        return openai_error(err)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": service.model_id}
    seed, usage = parsed.options.seed, Usage()
    events = service.complete(parsed, usage, gone=lambda: _client_gone(request))
    if not parsed.stream:
        texts: list[str] = [""] * (len(parsed.prompts) * parsed.n)
        reasons: list[str | None] = [None] * len(texts)
        async with contextlib.aclosing(events):
            async for index, text, reason in events:
                texts[index] += text
                reasons[index] = reason or reasons[index]
        choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
        return web.json_response({**head, "choices": choices, "usage": usage.as_dict(), "seed": seed},
                                 headers={"X-Seed": str(seed)})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", "X-Seed": str(seed)})
    await response.prepare(request)
    try:
        async with contextlib.aclosing(events):
            async for index, text, reason in events:
                choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
                await _send_event(response, {**head, "choices": [choice]})
        if parsed.include_usage:
            await _send_event(response, {**head, "choices": [], "usage": usage.as_dict()})
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:  # the client left mid-write; generation has stopped with it
        logging.info("client went away during a stream")
    return response


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _send_event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_entry(request.app[SERVICE])]})


async def model(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if request.match_info["model"] != service.model_id:
        return openai_error(BadRequest(f"model {request.match_info['model']!r} is not served here; "
                                       f"this service serves {service.model_id!r}", param="model",
                                       code="model_not_found", status=404))
    return web.json_response(_model_entry(service))


def _model_entry(service: Service) -> dict[str, Any]:
    return {"id": service.model_id, "object": "model", "created": service.description.get("created", 0),
            "owned_by": "verne", "facts": service.description.get("facts", {})}


async def _json_body(request: web.Request, limits: Limits) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise BadRequest(f"request body has {request.content_length} bytes; "
                         f"the limit is {limits.max_body_bytes}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"request body is over the limit of {limits.max_body_bytes} bytes") from None
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object such as {\"prime\": \"The\", \"length\": 200}")
    return body


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response({"status": "ok", **service.description,
                              "generated_tokens": service.generated_tokens})


# --------------------------------------------------------------------------- the page


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>verne: {title}</title>
<style>
* {{ box-sizing: border-box; }}
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 0 auto; padding: 1rem;
  line-height: 1.4; }}
h1 {{ margin: .2rem 0; font-size: 1.6rem; }} h2 {{ font-size: 1.1rem; margin: 1rem 0 .4rem; }}
.subtitle {{ margin: 0 0 .8rem; color: #555; overflow-wrap: anywhere; }}
label {{ display: block; font-size: .9rem; margin-bottom: .15rem; }}
input, select, textarea, button {{ font: inherit; width: 100%; padding: .35rem; }}
.controls {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(8.5rem, 1fr));
  gap: .6rem 1rem; margin: .6rem 0; align-items: end; }}
.wide {{ grid-column: span 2; }}
.buttons {{ display: flex; gap: .6rem; align-items: center; flex-wrap: wrap; }}
.buttons button {{ width: auto; padding: .5rem 1.4rem; }}
pre {{ white-space: pre-wrap; overflow-wrap: anywhere; background: #f4f4f4; padding: .8rem;
  margin: .5rem 0; }}
.error {{ color: #b00020; }} #status {{ color: #555; margin: 0; }}
details {{ background: #f8f8f8; padding: .4rem .8rem; margin: .8rem 0; }}
dl {{ display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: .5rem 0; }}
dt {{ color: #555; }} dd {{ margin: 0; overflow-wrap: anywhere; }}
@media (max-width: 32rem) {{ body {{ padding: .5rem; }} dl {{ grid-template-columns: 1fr; }}
  dd {{ margin-bottom: .3rem; }} }}
</style></head>
<body><h1>verne</h1><p class="subtitle">{title}</p>
<details id="facts" open><summary>Model</summary><dl>{facts}</dl></details>
<form id="generate-form" method="get" action="/ui">
<label for="prime">Prime</label><textarea id="prime" name="prime" rows="3">{prime}</textarea>
<div class="controls">
<div><label for="length">Length (tokens)</label>
<input id="length" name="length" type="number" min="1" max="{max_length}" value="{length}"></div>
<div><label for="temperature">Temperature</label>
<input id="temperature" name="temperature" type="number" min="0" max="{max_temperature}" step="0.05"
 value="{temperature}"></div>
<div><label for="top_k">Top-k (0: all)</label>
<input id="top_k" name="top_k" type="number" min="0" value="{top_k}"></div>
<div><label for="top_p">Top-p (1: all)</label>
<input id="top_p" name="top_p" type="number" min="0.01" max="1" step="0.01" value="{top_p}"></div>
<div class="wide"><label for="sample_mode">Mode</label>
<select id="sample_mode" name="sample_mode">{modes}</select></div>
<div><label for="seed">Seed (empty: random)</label>
<input id="seed" name="seed" type="number" min="0" value="{seed}"></div>
<div><label for="num_samples">Samples</label>
<input id="num_samples" name="num_samples" type="number" min="1" max="{max_samples}"
 value="{num_samples}"></div>
</div>
<div class="buttons"><button id="submit" type="submit">Generate</button>
<button id="stop" type="button" disabled>Stop</button>
<p id="status" data-state="{state}">{status}</p></div>
</form>
<div id="outputs">{result}</div>
<script>
const $ = (id) => document.getElementById(id);
let controller = null;
function setStatus(state, text) {{ $("status").dataset.state = state; $("status").textContent = text; }}
function showError(message) {{
  const p = document.createElement("p"); p.id = "error"; p.className = "error"; p.textContent = message;
  $("outputs").replaceChildren(p); setStatus("error", "");
}}
$("stop").addEventListener("click", () => {{ if (controller) controller.abort(); }});
$("generate-form").addEventListener("submit", async (event) => {{
  event.preventDefault();
  if (controller) controller.abort();
  const number = (id) => Number($(id).value);
  const prime = $("prime").value;
  const body = {{prompt: prime, max_tokens: number("length"), temperature: number("temperature"),
    top_k: number("top_k"), top_p: number("top_p"), sample_mode: number("sample_mode"),
    n: number("num_samples"), stream: true}};
  if ($("seed").value !== "") body.seed = number("seed");
  const mine = controller = new AbortController();
  $("stop").disabled = false;
  setStatus("generating", "generating…");
  try {{
    const response = await fetch("/v1/completions", {{method: "POST", signal: mine.signal,
      headers: {{"Content-Type": "application/json"}}, body: JSON.stringify(body)}});
    if (!response.ok) {{ showError((await response.json()).error.message); return; }}
    const seed = response.headers.get("X-Seed");
    const outputs = [];
    for (let i = 0; i < body.n; i++) {{
      const pre = document.createElement("pre");
      pre.id = i === 0 ? "output" : `output-${{i + 1}}`; pre.className = "sample"; pre.textContent = prime;
      outputs.push(pre);
    }}
    $("outputs").replaceChildren(...outputs);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", finished = false;
    for (;;) {{
      const {{value, done}} = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {{
        const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") {{ finished = true; continue; }}
        for (const choice of JSON.parse(line.slice(6)).choices) {{
          outputs[choice.index].textContent += choice.text;
        }}
      }}
    }}
    setStatus(finished ? "done" : "error", finished ? `done (seed ${{seed}})` : "the stream ended early");
  }} catch (err) {{
    if (err.name === "AbortError") setStatus("stopped", "stopped");
    else showError(String(err));
  }} finally {{
    if (controller === mine) {{ controller = null; $("stop").disabled = true; }}
  }}
}});
</script>
</body></html>
"""
_FORM_FIELDS = ("prime", "length", "temperature", "top_k", "top_p", "sample_mode", "seed", "num_samples")
_MODES = ((0, "0: most likely token"), (1, "1: sample every token"), (2, "2: sample at word boundaries"))


async def ui(request: web.Request) -> web.Response:
    """The page; with query parameters (a browser without JavaScript) it shows their samples."""
    service = request.app[SERVICE]
    query = {k: v for k, v in request.query.items() if k in _FORM_FIELDS}
    shown = {**_DEFAULTS, "seed": "", **query}
    result, state, status = "", "idle", ""
    if query:
        try:
            parsed = parse_request(query, service.limits)
            texts = await service.generate(parsed)
            shown["seed"] = str(parsed.options.seed)
            result = "".join(f'<pre id="{"output" if i == 0 else f"output-{i + 1}"}" class="sample">'
                             f"{html.escape(text)}</pre>" for i, text in enumerate(texts))
            state, status = "done", f"done (seed {parsed.options.seed})"
        except BadRequest as err:
            result = f'<p class="error" id="error">{html.escape(str(err))}</p>'
            state = "error"
    selected = str(shown["sample_mode"])
    modes = "".join(f'<option value="{value}"{" selected" if str(value) == selected else ""}>'
                    f"{html.escape(label)}</option>" for value, label in _MODES)
    what = service.description
    fields = {name: html.escape(str(shown[name])) for name in _FORM_FIELDS}
    page = _PAGE.format(
        title=html.escape(f"{what['job_dir']} ({what['language_model']}-level)"),
        facts=facts_html(what.get("facts", {})), max_length=service.limits.max_length,
        max_temperature=service.limits.max_temperature, max_samples=service.limits.max_samples,
        modes=modes, result=result, state=state, status=html.escape(status), **{
            k: v for k, v in fields.items() if k != "sample_mode"})
    return web.Response(text=page, content_type="text/html")


def facts_html(facts: Mapping[str, Any]) -> str:
    """The model panel's rows: what the model is and how well it did on validation text."""
    rows = [("Cell", facts.get("cell")),
            ("Layers × size", f"{facts['layers']} × {facts['size']}" if "layers" in facts else None),
            ("Tokenizer", f"{facts['tokenizer']}, vocabulary {facts['vocab_size']:,}"
             if "tokenizer" in facts else None),
            ("Step", f"{facts['step']:,}" if "step" in facts else None),
            ("Validation", _validation_text(facts)),
            ("Runs on", facts.get("runtime", "").removeprefix("model runs on: ") or None)]
    return "".join(f'<dt>{html.escape(name)}</dt>'
                   f'<dd id="fact-{name.split()[0].lower()}">{html.escape(str(value))}</dd>'
                   for name, value in rows if value is not None)


def _validation_text(facts: Mapping[str, Any]) -> str:
    if "valid_loss" not in facts:
        return "not evaluated (train with evaluation, or run trainer.evaluate)"
    text = f"{facts['valid_loss']:.4f} nats/token"
    if facts.get("valid_bits_per_char") is not None:
        text += f", {facts['valid_bits_per_char']:.4f} bits/char"
    return f"{text} ({facts['valid_source']})"


# --------------------------------------------------------------------------- what is served


def model_facts(job_dir: str, hparams: Any, metadata: Any, checkpoint: str, best: bool) -> dict[str, Any]:
    """Cell, size, tokenizer, step and the validation loss of the last evaluation, for the page,
    /healthz and /v1/models.

    The validation loss comes from `trainer.evaluate`'s eval-valid[-best].json when there is one
    (and names its step); else from training's own evaluations, whose best loss the checkpoint
    keeps (`best_loss`, what best/ was chosen by).
    """
    from trainer import checkpoints, kernels

    size = hparams.d_model if hparams.cell == "transformer" else hparams.lstm_state_size
    facts: dict[str, Any] = {
        "cell": hparams.cell, "layers": hparams.layers, "size": size, "tokenizer": metadata.tokenizer,
        "vocab_size": metadata.vocab_size, "step": _checkpoint_step(checkpoint),
        "precision": hparams.precision, "runtime": kernels.describe_runtime(portable=True)}
    loss, source = None, ""
    evaluated = checkpoints.join(job_dir, f"eval-valid{'-best' if best else ''}.json")
    try:
        import tensorflow as tf

        if tf.io.gfile.exists(evaluated):
            result = json.loads(tf.io.gfile.GFile(evaluated).read())
            loss, source = float(result["loss"]), f"trainer.evaluate at step {result.get('step', '?')}"
        else:
            best_loss = float(tf.train.load_checkpoint(checkpoint).get_tensor(_BEST_LOSS_KEY))
            if math.isfinite(best_loss):
                loss, source = best_loss, "the best of training's evaluations"
    except (OSError, ValueError, KeyError, tf.errors.OpError) as err:
        logging.warning("no validation loss for the model panel: %s", err)
    if loss is not None:
        per_token = metadata.splits["valid"].characters_per_token if "valid" in metadata.splits else 0
        facts.update(valid_loss=loss, valid_source=source,
                     valid_bits_per_char=loss / per_token / math.log(2) if per_token else None)
    return facts


# How the training checkpoint names the best validation loss (trainer.runner's `best_loss`).
_BEST_LOSS_KEY = "best_loss/.ATTRIBUTES/VARIABLE_VALUE"


def _checkpoint_step(path: str) -> int:
    try:
        return int(path.rsplit("-", 1)[-1])
    except ValueError:
        return 0


def make_app(service: Service) -> web.Application:
    # aiohttp refuses larger bodies itself (413); _json_body turns that into our 400.
    application = web.Application(client_max_size=service.limits.max_body_bytes)
    application[SERVICE] = service
    application.add_routes([web.get("/", plain_text), web.post("/v1/generate", generate_json),
                            web.post("/v1/completions", completions), web.get("/v1/models", models),
                            web.get("/v1/models/{model}", model),
                            web.get("/healthz", healthz), web.get("/ui", ui)])
    return application


async def serve_forever(service: Service, host: str, port: int) -> None:
    runner = web.AppRunner(make_app(service))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # The bound address (port 0 picks a free one): tests and scripts read this line.
    for address in runner.addresses:
        print(f"serving http://{address[0]}:{address[1]}/ui", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def define_flags() -> None:
    """The hyperparameter flags (so --job-dir may hold %JOB%) plus serve's own. Idempotent."""
    if "port" in flags.FLAGS:
        return
    from trainer.flags import define_best_flag, define_hparams_flags

    define_hparams_flags()
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes the service to the network.")
    flags.DEFINE_integer("port", 8080, "Port to listen on (0: any free port, printed at start).")
    define_best_flag()
    flags.DEFINE_integer("max_length", Limits.max_length, "Longest sample a request may ask for (tokens).")
    flags.DEFINE_integer("max_prime_chars", Limits.max_prime_chars, "Longest prime a request may send.")
    flags.DEFINE_integer("max_samples", Limits.max_samples, "Most samples one request may ask for.")


@run_cli
def main(argv: list[str]) -> int:
    from trainer import checkpoints, kernels
    from trainer.flags import hparams_from_command_line

    flag = flags.FLAGS
    hparams = hparams_from_command_line(argv)
    if not 0 <= flag.port <= 65535:
        raise UsageError(f"--port={flag.port}: must be in [0, 65535]")
    print(kernels.describe_runtime(portable=True), file=sys.stderr, flush=True)
    limits = Limits(max_length=flag.max_length, max_prime_chars=flag.max_prime_chars,
                    max_samples=flag.max_samples)
    job_dir = checkpoints.resolve_job_dir(hparams)
    trained, metadata, language_model, checkpoint = checkpoints.load_job_at(job_dir, flag.best)
    generator = TextGenerator(language_model, metadata)
    description = {"job_dir": job_dir, "model": os.path.basename(job_dir.rstrip("/")),
                   "created": int(time.time()), "language_model": metadata.tokenizer,
                   "vocab_size": metadata.vocab_size, "best": flag.best,
                   "facts": model_facts(job_dir, trained, metadata, checkpoint, flag.best)}
    service = Service(generator, limits, description)
    service.warm_up()
    print(f"serving {job_dir} as model {service.model_id!r}", file=sys.stderr, flush=True)
    try:
        asyncio.run(serve_forever(service, flag.host, flag.port))
    except OSError as err:
        raise UsageError(f"--host={flag.host} --port={flag.port}: cannot listen ({err.strerror}); "
                         "pick another --port") from None
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)

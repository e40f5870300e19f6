"""`python -m trainer.serve`: an HTTP sampling service with a small web page (aiohttp).

    python -m trainer.serve --job-dir job/NAME [--port 8080] [--host 127.0.0.1] [--best]

- `GET /?prime=The&n=200&sample_mode=2` -> the sample as plain text (char-rnn-tensorflow's
  service); also `temperature`, `top_k`, `top_p`, `seed`, `length` (= `n`).
- `POST /v1/generate` with JSON {prime, length, temperature, sample_mode, top_k, top_p, seed,
  num_samples, no_unk} (all optional) -> {"samples": [...], "seed": S, ...}.
- `GET /healthz` -> {"status": "ok", ...}; `GET /ui` -> a form that shows generated text.

Requests outside the bounds (length, temperature, prime length, samples, body size) get HTTP 400
with a message. The model runs on one worker thread, so concurrent requests queue and each gets
exactly what it would get alone (same seed, same text). Without a seed a request gets a random
one, reported back. Binds to 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import random
import signal
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from absl import app, flags, logging
from aiohttp import web

from trainer.errors import UsageError, run_cli
from trainer.sampling import SamplingOptions, TextGenerator


@dataclasses.dataclass(frozen=True)
class Limits:
    max_length: int = 2000
    max_prime_chars: int = 2000
    max_samples: int = 8
    max_temperature: float = 5.0
    max_body_bytes: int = 16384


class BadRequest(ValueError):
    """A request outside the bounds or malformed; the message goes back with HTTP 400."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prime: str
    length: int
    num_samples: int
    options: SamplingOptions


_DEFAULTS = {"prime": "", "length": 200, "temperature": 1.0, "sample_mode": 1, "top_k": 0,
             "top_p": 1.0, "num_samples": 1, "no_unk": False}


def parse_request(values: Mapping[str, Any], limits: Limits,
                  random_seed: Callable[[], int] = lambda: random.randrange(2**31)) -> GenerationRequest:
    """Validates request values (query strings or JSON) against `limits`; raises BadRequest."""
    unknown = sorted(set(values) - set(_DEFAULTS) - {"n", "seed"})
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted([*_DEFAULTS, 'n', 'seed']))}")
    merged = {**_DEFAULTS, **values}
    if "n" in values:  # char-rnn-tensorflow's name for the length
        merged["length"] = values["n"]
    prime = merged["prime"]
    if not isinstance(prime, str):
        raise BadRequest("prime must be a string")
    if len(prime) > limits.max_prime_chars:
        raise BadRequest(f"prime has {len(prime)} characters; the limit is {limits.max_prime_chars}")
    length = _number(merged, "length", int, 1, limits.max_length)
    num_samples = _number(merged, "num_samples", int, 1, limits.max_samples)
    temperature = _number(merged, "temperature", float, 0.0, limits.max_temperature)
    seed = values.get("seed")
    seed = random_seed() if seed in (None, "") else _number(values, "seed", int, 0, 2**63 - 1)
    try:
        options = SamplingOptions(
            temperature=temperature, sample_mode=_number(merged, "sample_mode", int, 0, 2),
            top_k=_number(merged, "top_k", int, 0, 10**9), top_p=_number(merged, "top_p", float, 0.0, 1.0),
            seed=seed, no_unk=_boolean(merged["no_unk"])).validate()
    except ValueError as err:
        raise BadRequest(str(err).replace("--", "")) from None
    return GenerationRequest(prime, length, num_samples, options)


def _number(values: Mapping[str, Any], name: str, kind: type, low: float, high: float) -> Any:
    value = values[name]
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise BadRequest(f"{name} must be {what}, got {value!r}") from None
    if not low <= number <= high:
        raise BadRequest(f"{name}={number} is out of range [{low}, {high}]")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("", "0", "false", "no", "off"):
        return False
    raise BadRequest(f"no_unk must be true or false, got {value!r}")


class Service:
    """The model behind one worker thread: TF models are not safe to call from many threads."""

    def __init__(self, generator: TextGenerator, limits: Limits, description: dict[str, Any]) -> None:
        self.generator, self.limits, self.description = generator, limits, description
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    async def generate(self, request: GenerationRequest) -> list[str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self.generator.generate, request.prime, request.length, request.options,
            request.num_samples)

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
    return web.json_response({"status": "ok", **request.app[SERVICE].description})


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>verne: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; padding: 0 1rem; }}
label {{ display: block; margin: .6rem 0 .2rem; }} textarea {{ width: 100%; }}
pre {{ white-space: pre-wrap; background: #f4f4f4; padding: 1rem; }} .error {{ color: #b00020; }}
</style></head>
<body><h1>verne</h1><p>{title}</p>
<form id="generate-form" method="get" action="/ui">
<label for="prime">Prime</label><textarea id="prime" name="prime" rows="3">{prime}</textarea>
<label for="length">Length (tokens)</label>
<input id="length" name="length" type="number" min="1" max="{max_length}" value="{length}">
<label for="temperature">Temperature</label>
<input id="temperature" name="temperature" type="number" min="0" max="{max_temperature}" step="0.05"
 value="{temperature}">
<label for="sample_mode">Mode</label><select id="sample_mode" name="sample_mode">{modes}</select>
<label for="seed">Seed (empty: random)</label>
<input id="seed" name="seed" type="number" min="0" value="{seed}">
<p><button id="submit" type="submit">Generate</button></p>
</form>
{result}
</body></html>
"""
_FORM_FIELDS = ("prime", "length", "temperature", "sample_mode", "seed")
_MODES = ((0, "0: most likely token"), (1, "1: sample every token"), (2, "2: sample at word boundaries"))


async def ui(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    query = {k: v for k, v in request.query.items() if k in _FORM_FIELDS}
    shown = {**_DEFAULTS, "seed": "", **query}
    result = ""
    if query:
        try:
            parsed = parse_request(query, service.limits)
            (text,) = await service.generate(parsed)
            shown["seed"] = str(parsed.options.seed)
            result = (f"<h2>Generated (seed {parsed.options.seed})</h2>"
                      f'<pre id="output">{html.escape(text)}</pre>')
        except BadRequest as err:
            result = f'<p class="error" id="error">{html.escape(str(err))}</p>'
    selected = str(shown["sample_mode"])
    modes = "".join(f'<option value="{value}"{" selected" if str(value) == selected else ""}>'
                    f"{html.escape(label)}</option>" for value, label in _MODES)
    what = service.description
    page = _PAGE.format(
        title=html.escape(f"{what['job_dir']} ({what['language_model']}-level)"),
        prime=html.escape(str(shown["prime"])), length=html.escape(str(shown["length"])),
        temperature=html.escape(str(shown["temperature"])), seed=html.escape(str(shown["seed"])),
        max_length=service.limits.max_length, max_temperature=service.limits.max_temperature,
        modes=modes, result=result)
    return web.Response(text=page, content_type="text/html")


def make_app(service: Service) -> web.Application:
    # aiohttp refuses larger bodies itself (413); _json_body turns that into our 400.
    application = web.Application(client_max_size=service.limits.max_body_bytes)
    application[SERVICE] = service
    application.add_routes([web.get("/", plain_text), web.post("/v1/generate", generate_json),
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
    from trainer import checkpoints
    from trainer.babble import load_text_generator
    from trainer.flags import hparams_from_command_line

    flag = flags.FLAGS
    hparams = hparams_from_command_line(argv)
    if not 0 <= flag.port <= 65535:
        raise UsageError(f"--port={flag.port}: must be in [0, 65535]")
    limits = Limits(max_length=flag.max_length, max_prime_chars=flag.max_prime_chars,
                    max_samples=flag.max_samples)
    job_dir = checkpoints.resolve_job_dir(hparams)
    generator = load_text_generator(job_dir, flag.best)
    description = {"job_dir": job_dir, "language_model": generator.metadata.tokenizer,
                   "vocab_size": generator.metadata.vocab_size, "best": flag.best}
    service = Service(generator, limits, description)
    service.warm_up()
    logging.info("serving %s", job_dir)
    try:
        asyncio.run(serve_forever(service, flag.host, flag.port))
    except OSError as err:
        raise UsageError(f"--host={flag.host} --port={flag.port}: cannot listen ({err.strerror}); "
                         "pick another --port") from None
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)

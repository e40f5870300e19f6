"""`python -m trainer.serve`: the endpoints, their bounds (HTTP 400) and concurrent requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from generation_job import Server, shared_server, trained_job

from trainer.serve import BadRequest, Limits, parse_request


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = shared_server(trained_job(tmp_path_factory.getbasetemp() / "generation", "char"))
    yield running
    running.stop()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8")


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def generate(server: Server, **body: object) -> tuple[int, dict]:
    return post(server.url + "/v1/generate", json.dumps(body).encode())


def test_plain_text_like_char_rnn_tensorflow(server: Server) -> None:
    status, text = get(server.url + "/?" + urllib.parse.urlencode({"prime": "The", "n": 50, "sample_mode": 2,
                                                                    "seed": 4, "no_unk": 1}))
    assert status == 200 and text.startswith("The") and len(text) == 53
    assert get(server.url + "/?prime=The&n=50&sample_mode=2&seed=4&no_unk=1") == (200, text)


def test_json_generate_and_health(server: Server) -> None:
    status, body = generate(server, prime="All", length=20, num_samples=3, seed=6, temperature=0.7,
                            no_unk=True)
    assert status == 200, body
    assert len(body["samples"]) == 3 and all(s.startswith("All") and len(s) == 23 for s in body["samples"])
    assert body["seed"] == 6 and body["model"]["language_model"] == "char"
    status, unseeded = generate(server, length=5)
    assert status == 200 and isinstance(unseeded["seed"], int), "a random seed is reported back"
    status, health = get(server.url + "/healthz")
    assert status == 200 and json.loads(health)["status"] == "ok"


@pytest.mark.parametrize("body, message", [
    ({"length": 100000}, "length=100000 is out of range"),
    ({"length": 0}, "length=0 is out of range"),
    ({"temperature": 9}, "temperature=9.0 is out of range"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"prime": "x" * 2001}, "prime has 2001 characters"),
    ({"num_samples": 99}, "num_samples=99"),
    ({"sample_mode": 5}, "sample_mode=5"),
    ({"top_p": 0}, "top_p"),
    ({"colour": "red"}, "unknown parameter(s) colour"),
])
def test_out_of_bounds_requests_get_400_with_a_message(server: Server, body: dict, message: str) -> None:
    status, answer = generate(server, **body)
    assert status == 400 and message in answer["error"]


def test_malformed_and_oversized_bodies_get_400(server: Server) -> None:
    assert post(server.url + "/v1/generate", b"[1, 2]")[0] == 400
    assert "not valid JSON" in post(server.url + "/v1/generate", b"{nope")[1]["error"]
    status, answer = post(server.url + "/v1/generate", json.dumps({"prime": "a" * 20000}).encode())
    assert status == 400 and "limit is 16384" in answer["error"]
    status, text = get(server.url + "/?n=-3")
    assert status == 400 and text.startswith("error: length=-3")


def test_concurrent_requests_each_get_their_own_text(server: Server) -> None:
    seeds = list(range(20, 28))
    def samples(seed: int) -> list[str]:
        return generate(server, prime="First", length=40, seed=seed)[1]["samples"]

    alone = {seed: samples(seed) for seed in seeds}
    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        answers = pool.map(samples, seeds)
        together = dict(zip(seeds, answers, strict=True))
    assert together == alone
    assert len({tuple(samples) for samples in alone.values()}) == len(seeds)


def test_ui_page_renders_generated_text(server: Server) -> None:
    status, page = get(server.url + "/ui")
    assert status == 200 and '<form id="generate-form"' in page and 'id="output"' not in page
    status, page = get(server.url + "/ui?prime=%3Cb%3EAll&length=10&temperature=0.5&sample_mode=1&seed=3")
    assert status == 200 and '<pre id="output">&lt;b&gt;All' in page, "output is escaped"
    status, page = get(server.url + "/ui?prime=All&length=99999")
    assert status == 200 and 'id="error"' in page and "length=99999 is out of range" in page


def test_parse_request_defaults_and_aliases() -> None:
    parsed = parse_request({"prime": "a", "n": "7", "no_unk": "true"}, Limits(), random_seed=lambda: 42)
    assert (parsed.length, parsed.options.seed, parsed.options.no_unk) == (7, 42, True)
    with pytest.raises(BadRequest, match="length must be an integer"):
        parse_request({"length": 2.5}, Limits())


def test_binds_loopback_by_default(server: Server) -> None:
    assert urllib.parse.urlparse(server.url).hostname == "127.0.0.1"

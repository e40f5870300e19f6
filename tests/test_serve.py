"""`python -m trainer.serve`: the endpoints, their bounds (HTTP 400) and concurrent requests."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    assert status == 200 and '<pre id="output" class="sample">&lt;b&gt;All' in page, "output is escaped"
    status, page = get(server.url + "/ui?prime=All&length=99999")
    assert status == 200 and 'id="error"' in page and "length=99999 is out of range" in page


def test_parse_request_defaults_and_aliases() -> None:
    parsed = parse_request({"prime": "a", "n": "7", "no_unk": "true"}, Limits(), random_seed=lambda: 42)
    assert (parsed.length, parsed.options.seed, parsed.options.no_unk) == (7, 42, True)
    with pytest.raises(BadRequest, match="length must be an integer"):
        parse_request({"length": 2.5}, Limits())


def test_binds_loopback_by_default(server: Server) -> None:
    assert urllib.parse.urlparse(server.url).hostname == "127.0.0.1"


# --------------------------------------------------------------------------- OpenAI's completions API


def openai_client(server: Server) -> object:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def health(server: Server) -> dict:
    return json.loads(get(server.url + "/healthz")[1])


def test_openai_client_completions_match_verne_api(server: Server) -> None:
    client = openai_client(server)
    (model,) = client.models.list().data
    assert model.id == client.models.retrieve(model.id).id and health(server)["job_dir"].endswith(model.id)
    sampling = {"temperature": 0.7, "seed": 6, "n": 2, "extra_body": {"top_k": 5, "sample_mode": 1}}
    answer = client.completions.create(model=model.id, prompt="All", max_tokens=20, **sampling)
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(len(c.text) == 20 and c.finish_reason == "length" for c in answer.choices)
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 40, 43)
    status, verne = generate(server, prime="All", length=20, num_samples=2, seed=6, temperature=0.7, top_k=5)
    assert status == 200 and [c.text for c in answer.choices] == [s[3:] for s in verne["samples"]], \
        "the same seed gives the same text through either API"

    texts, reasons, usage, chunks = ["", ""], {}, None, 0
    for chunk in client.completions.create(model=model.id, prompt="All", max_tokens=20, stream=True,
                                           stream_options={"include_usage": True}, **sampling):
        chunks += 1
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert texts == [c.text for c in answer.choices] and reasons == {0: "length", 1: "length"}
    assert usage.completion_tokens == 40 and chunks > 4, "streamed in pieces, usage at the end"

    echoed = client.completions.create(model=model.id, prompt=["All", "First"], max_tokens=5, echo=True,
                                       seed=2)
    assert [c.text[:-5] for c in echoed.choices] == ["All", "First"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_a_completion_before_them(server: Server, stream: bool) -> None:
    client = openai_client(server)
    model = client.models.list().data[0].id
    whole = client.completions.create(model=model, prompt="The", max_tokens=40, seed=11).choices[0].text
    stop = whole[12:14]
    cut = whole.index(stop)
    answer = client.completions.create(model=model, prompt="The", max_tokens=40, seed=11,
                                       stop=[stop, "never seen"], stream=stream)
    if stream:
        chunks = list(answer)
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        text, reason = answer.choices[0].text, answer.choices[0].finish_reason
        assert answer.usage.completion_tokens == cut + len(stop), "tokens up to the stop string's end"
    assert (text, reason) == (whole[:cut], "stop")


def test_openai_errors(server: Server) -> None:
    import openai

    client = openai_client(server)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=client.models.list().data[0].id, prompt="x", max_tokens=99999)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "max_tokens"
    assert "max_tokens=99999 is out of range" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-nothing", prompt="x")
    assert missing.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body, param, message", [
    ({"max_tokens": 0}, "max_tokens", "max_tokens=0 is out of range"),
    ({"prompt": [1, 2, 3]}, "prompt", "token ids is not supported"),
    ({"prompt": "x" * 2001}, "prompt", "prompt has 2001 characters"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"logprobs": 2}, "logprobs", "not supported"),
    ({"prompt": ["a", "b", "c"], "n": 3}, "n", "ask for 9 completions; the limit is 8"),
    ({"top_p": 0}, "top_p", "top_p"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"colour": "red"}, "colour", "unknown parameter(s) colour"),
])
def test_completions_bad_requests_get_openai_error_objects(server: Server, body: dict, param: str,
                                                           message: str) -> None:
    status, answer = post(server.url + "/v1/completions", json.dumps(body).encode())
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param and message in answer["error"]["message"], answer


def test_stream_arrives_as_generated_and_stops_when_the_client_goes_away(server: Server) -> None:
    import http.client

    address = urllib.parse.urlparse(server.url)
    before = health(server)["generated_tokens"]
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    connection.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                       body=json.dumps({"prompt": "All", "max_tokens": 2000, "stream": True, "seed": 1}))
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    assert response.readline().startswith(b"data: {")
    assert health(server)["generated_tokens"] - before < 2000, "the first text came before the last token"
    response.close()
    connection.close()
    settled = health(server)["generated_tokens"]
    for _ in range(60):  # until nothing more is generated
        time.sleep(0.5)
        settled, previous = health(server)["generated_tokens"], settled
        if settled == previous:
            break
    assert settled - before < 2000, f"{settled - before} tokens: generation went on without a client"


def test_an_nfd_prompt_gets_what_its_nfc_form_gets(server: Server) -> None:
    import unicodedata

    texts = []
    for prompt in (unicodedata.normalize("NFD", "Ciéizen café"), "Ciéizen café"):
        status, answer = post(server.url + "/v1/completions",
                              json.dumps({"prompt": prompt, "max_tokens": 30, "seed": 4}).encode())
        assert status == 200, answer
        texts.append(answer["choices"][0]["text"])
    assert texts[0] == texts[1]


def test_model_facts_take_the_validation_loss_of_the_last_evaluation(server: Server, tmp_path: Path) -> None:
    import math
    import shutil

    from trainer import checkpoints
    from trainer.serve import model_facts

    job = tmp_path / "job"
    shutil.copytree(health(server)["job_dir"], job)
    metadata = checkpoints.saved_metadata(str(job))

    def facts() -> dict:
        return model_facts(str(job), checkpoints.saved_hparams(str(job)), metadata,
                           checkpoints.checkpoint_path(str(job)), best=False)

    trained = facts()
    assert (trained["cell"], trained["layers"], trained["size"], trained["step"]) == ("lstm", 2, 32, 30)
    assert trained["valid_source"] == "the best of training's evaluations" and trained["valid_loss"] > 0
    (job / "eval-valid.json").write_text(json.dumps({"split": "valid", "loss": 2.0, "step": 30}))
    evaluated = facts()
    per_char = metadata.splits["valid"].characters_per_token
    assert evaluated["valid_loss"] == 2.0 and evaluated["valid_source"] == "trainer.evaluate at step 30"
    assert evaluated["valid_bits_per_char"] == pytest.approx(2.0 / per_char / math.log(2))

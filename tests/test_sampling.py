"""The generation engine: seeds, argmax, top-k / top-p, sample mode 2, <unk>, streaming, bytes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from generation_job import MODEL, autograph_conversions, trained_job

from preprocessing import contract
from preprocessing.tokenizers import byte_vocab
from trainer import checkpoints, sampling
from trainer.hparams import HParams
from trainer.models import build_model
from trainer.sampling import Generator, SamplingOptions, TextGenerator


@pytest.fixture(scope="session")
def char_job(tmp_path_factory: pytest.TempPathFactory) -> str:
    return trained_job(tmp_path_factory.getbasetemp() / "generation", "char")


@pytest.fixture(scope="session")
def char_model(char_job: str) -> tuple:
    _, metadata, model = checkpoints.load_job(char_job)
    return metadata, model


def replay_logits(model: tf.keras.Model, prime: list[int], tokens: np.ndarray) -> np.ndarray:
    """float [B, L, V]: the logits each generated token was chosen from, one eager step at a time."""
    batch = tokens.shape[0]
    logits, state = model(tf.constant([prime] * batch, tf.int32), model.initial_state(batch))
    steps = [logits[:, -1].numpy()]
    for i in range(tokens.shape[1] - 1):
        logits, state = model(tf.constant(tokens[:, i:i + 1], tf.int32), state)
        steps.append(logits[:, -1].numpy())
    return np.stack(steps, axis=1)


def test_same_seed_same_tokens_however_the_calls_are_split(char_model: tuple) -> None:
    metadata, model = char_model
    generator = Generator(model, metadata.vocab, "char", metadata.unk_id)
    options = SamplingOptions(temperature=1.0, seed=11)
    whole = generator.generate([3, 4, 5], 60, options, batch_size=3)
    streamed = np.concatenate(list(generator.stream([3, 4, 5], 60, options, batch_size=3, chunk=7)), axis=1)
    np.testing.assert_array_equal(whole, streamed)
    other = generator.generate([3, 4, 5], 60, SamplingOptions(temperature=1.0, seed=12), batch_size=3)
    assert (whole != other).any()
    assert (whole[0] != whole[1]).any(), "rows of one batch are independent samples"


def test_temperature_zero_is_argmax_of_the_models_logits(char_model: tuple) -> None:
    metadata, model = char_model
    prime = [5, 6, 7, 8]
    tokens = Generator(model).generate(prime, 40, SamplingOptions(temperature=0.0, seed=3))
    logits, state = model(tf.constant([prime]), model.initial_state(1))
    greedy = []
    for _ in range(40):
        greedy.append(int(np.argmax(logits[0, -1])))
        logits, state = model(tf.constant([[greedy[-1]]]), state)
    assert tokens[0].tolist() == greedy
    # The trainer's periodic-sample API is the same engine.
    assert sampling.Sampler(model).generate(prime, 40, temperature=0.0) == greedy


def test_top_k_never_leaves_the_k_most_likely(char_model: tuple) -> None:
    metadata, model = char_model
    generator = Generator(model, metadata.vocab, "char", metadata.unk_id)
    prime = [1, 2, 3]
    tokens = generator.generate(prime, 50, SamplingOptions(temperature=3.0, top_k=3, seed=5), batch_size=4)
    logits = replay_logits(model, prime, tokens)
    top3 = np.argsort(-logits, axis=-1)[..., :3]
    assert (top3 == tokens[..., None]).any(axis=-1).all()
    # At this temperature, without top-k, tokens outside the top 3 do come up: the check can fail.
    free = generator.generate(prime, 50, SamplingOptions(temperature=3.0, seed=5), batch_size=4)
    top3_free = np.argsort(-replay_logits(model, prime, free), axis=-1)[..., :3]
    assert not (top3_free == free[..., None]).any(axis=-1).all()


def test_truncation_of_synthetic_logits() -> None:
    logits = tf.math.log(tf.constant([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    kept = lambda k, p: np.isfinite(sampling.truncate_logits(logits, tf.constant(k), tf.constant(p)).numpy())  # noqa: E731
    assert kept(2, 1.0).tolist() == [[True, True, False, False, False]]
    assert kept(0, 0.75).tolist() == [[True, True, False, False, False]]  # 0.5 + 0.3 covers 0.75
    assert kept(0, 0.85).tolist() == [[True, True, True, False, False]]
    assert kept(0, 0.01).tolist() == [[True, False, False, False, False]]  # the top token always stays
    assert kept(0, 1.0).all()


def test_no_unk_bans_unk_even_when_it_is_most_likely() -> None:
    logits = tf.constant([[9.0, 1.0, 0.5, 0.0]] * 64)  # id 0 plays <unk>
    params = sampling.options_as_tensors(SamplingOptions(temperature=1.0, seed=2))
    boundary = tf.zeros([4], tf.bool)
    prev = tf.zeros([64], tf.int32)
    free = sampling.choose_next(logits, prev, tf.constant(0), params, boundary, tf.zeros([4]))
    banned = tf.constant(sampling.banned_logits(4, unk_id=0, no_unk=True))
    chosen = sampling.choose_next(logits, prev, tf.constant(0), params, boundary, banned)
    assert (free.numpy() == 0).any()
    assert (chosen.numpy() != 0).all()


def test_sample_mode_2_takes_argmax_inside_words(char_model: tuple) -> None:
    metadata, model = char_model
    generator = Generator(model, metadata.vocab, "char", metadata.unk_id)
    prime = [metadata.vocab.index(" ")]
    tokens = generator.generate(prime, 80, SamplingOptions(temperature=2.0, sample_mode=2, seed=9),
                                batch_size=4)
    logits = replay_logits(model, prime, tokens)
    previous = np.concatenate([np.full([4, 1], prime[0]), tokens[:, :-1]], axis=1)
    inside_word = ~np.vectorize(lambda t: metadata.vocab[t].isspace())(previous)
    greedy = logits.argmax(-1)
    assert (tokens[inside_word] == greedy[inside_word]).all()
    assert (tokens[~inside_word] != greedy[~inside_word]).any(), "after whitespace it samples"


def test_unknown_prime_characters_become_unk(char_model: tuple) -> None:
    metadata, model = char_model
    text_generator = TextGenerator(model, metadata)
    prime = text_generator.encode_prime("Fi€rst Zé")
    assert prime.unknown == ["€", "Z", "é"]
    assert prime.ids.count(metadata.unk_id) == 3
    (text,) = text_generator.generate("Fi€rst Zé", 20, SamplingOptions(seed=1, no_unk=True))
    assert text.startswith("Fi€rst Zé") and len(text) == len("Fi€rst Zé") + 20


def test_streamed_text_equals_generated_text_for_bytes() -> None:
    # Untrained and hot: nearly uniform bytes, so multi-byte and invalid sequences abound.
    model = build_model(HParams(language_model="byte", vocab_size=256, **MODEL))
    splits = {split: contract.SplitStats(0, 0, 0) for split in contract.SPLITS}
    metadata = contract.Metadata(tokenizer="byte", vocab=byte_vocab(), splits=splits)
    text_generator = TextGenerator(model, metadata)
    options = SamplingOptions(temperature=2.0, seed=4)
    whole = text_generator.generate("Größe ", 120, options)[0]
    pieces = [piece for (piece,) in text_generator.stream("Größe ", 120, options, chunk=1)]
    assert "".join(pieces) == whole and whole.startswith("Größe ")
    assert "\ufffd" in whole, "invalid sequences were generated and replaced"
    assert any(ord(c) > 127 and c != "\ufffd" for c in whole[6:]), "multi-byte characters survive"
    for piece in pieces:
        piece.encode("utf-8")  # valid UTF-8: no lone surrogates, incomplete sequences held back


@pytest.mark.parametrize("bad", [dict(sample_mode=3), dict(temperature=-1.0), dict(top_k=-1),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(temperature=float("nan")),
                                 dict(temperature=float("inf")), dict(top_p=float("nan")),
                                 dict(seed=-1), dict(seed=2**63), dict(top_k=2**31)])
def test_options_are_validated(bad: dict) -> None:
    (name,) = bad
    with pytest.raises(ValueError, match=f"--{name}="):
        SamplingOptions(**bad).validate()


def test_the_largest_valid_seed_and_top_k_become_tensors() -> None:
    options = SamplingOptions(seed=sampling.MAX_SEED, top_k=sampling.MAX_TOP_K).validate()
    params = sampling.options_as_tensors(options)
    assert int(params["seed"]) == 2**63 - 1 and int(params["top_k"]) == 2**31 - 1


def test_generation_traces_without_autograph(char_model: tuple) -> None:
    metadata, model = char_model
    with autograph_conversions() as converted:
        Generator(model).generate([3, 4], 5, SamplingOptions(seed=2))
    assert converted == []


def test_a_one_token_prime_traces_no_priming_loop(char_model: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's samples start from one token: tracing is most of their first call's time."""
    metadata, model = char_model
    options = SamplingOptions(seed=2)
    # A generator whose priming graph was traced for a longer prime runs a one-token prime through
    # the priming loop (its length is no longer static): zero iterations, the same tokens.
    looping = Generator(model)
    looping.generate([3, 4, 5], 2, options)
    through_loop = looping.generate([3], 30, options)
    traces, call = [], model.call
    monkeypatch.setattr(model, "call", lambda *args, **kwargs: traces.append(args) or call(*args, **kwargs))
    tokens = Generator(model).generate([3], 30, options)
    assert len(traces) == 2  # the prime's one step and the generation loop's
    np.testing.assert_array_equal(tokens, through_loop)

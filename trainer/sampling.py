"""Generation: prime once, then one model step per token with the state carried.

Everything that chooses tokens is TensorFlow ops inside one compiled `tf.while_loop`
(`generation_loop`), so the same code runs in `trainer.babble`, `trainer.serve`, the periodic
samples of training and the exported SavedModel (`trainer.export`), and gives the same text for
the same seed everywhere. Several samples are rows of one batch. Sampling is stateless, seeded by
(seed, step), so a seed fixes the text however generation is split into calls.

Sample modes follow char-rnn-tensorflow: 0 argmax at every step, 1 sample at every step,
2 sample only after a word boundary (whitespace) and take the argmax inside words, which keeps
words whole. Temperature 0 is argmax in every mode; `top_k` / `top_p` truncate what is sampled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from preprocessing import cleaning, contract
from preprocessing.subword import SPACE_MARK
from preprocessing.tokenizers import tokenizer_from_metadata
from trainer import kernels
from trainer.models.base import LanguageModel, State

# Sample modes, as char-rnn-tensorflow numbers them.
ARGMAX, SAMPLE, SAMPLE_AT_BOUNDARIES = 0, 1, 2
SAMPLE_MODES = (ARGMAX, SAMPLE, SAMPLE_AT_BOUNDARIES)
# Tokens generated per call of the compiled loop when streaming: large enough that the Python
# overhead of a call vanishes, small enough that text appears as it is written.
STREAM_CHUNK = 32
_NEG_INF = float("-inf")
# Seeds and top_k travel as int64 / int32 tensors; larger values cannot become tensors.
MAX_SEED = 2**63 - 1
MAX_TOP_K = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen from the model's logits.

    temperature 0 means argmax whatever the mode; top_k 0 and top_p 1 mean no truncation.
    """

    temperature: float = 1.0
    sample_mode: int = SAMPLE
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1
    no_unk: bool = False

    def validate(self) -> SamplingOptions:
        if self.sample_mode not in SAMPLE_MODES:
            raise ValueError(f"--sample_mode={self.sample_mode}: choose 0 (argmax), 1 (sample) or "
                             "2 (sample at word boundaries)")
        # NaN passes every comparison below as False, and an infinite temperature would
        # silently sample uniformly: both are mistakes, not settings.
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"--temperature={self.temperature}: must be a finite number >= 0 "
                             "(0 is argmax)")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"--top_k={self.top_k}: must be in [0, {MAX_TOP_K}] (0 keeps every token)")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed={self.seed}: must be in [0, {MAX_SEED}]")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top_p={self.top_p}: must be in (0, 1] (1 keeps every token)")
        return self


def truncate_logits(logits: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor) -> tf.Tensor:
    """Sets to -inf every logit outside the top k and outside the nucleus of mass top_p.

    logits float32 [B, V]; top_k int32 scalar (0: off); top_p float32 scalar (1: off). The most
    likely token always survives, so a row is never all -inf.
    """
    vocab = tf.shape(logits)[-1]

    def keep_top_k() -> tf.Tensor:
        kth = tf.math.top_k(logits, tf.minimum(top_k, vocab)).values[:, -1:]
        return tf.where(logits < kth, _NEG_INF, logits)

    logits = tf.cond(top_k > 0, keep_top_k, lambda: logits)

    def keep_nucleus() -> tf.Tensor:
        ordered = tf.sort(logits, direction="DESCENDING")
        mass_before = tf.cumsum(tf.nn.softmax(ordered), axis=-1, exclusive=True)
        # The smallest logit still inside the nucleus: everything below it goes.
        inside = tf.where(mass_before < top_p, ordered, tf.float32.max)
        threshold = tf.reduce_min(inside, axis=-1, keepdims=True)
        return tf.where(logits < threshold, _NEG_INF, logits)

    return tf.cond(top_p < 1.0, keep_nucleus, lambda: logits)


def choose_next(logits: tf.Tensor, prev: tf.Tensor, step: tf.Tensor, params: dict[str, tf.Tensor],
                boundary: tf.Tensor, banned: tf.Tensor) -> tf.Tensor:
    """One token per row: argmax or a sample, following the sample mode. Returns int32 [B].

    Sampling is stateless, seeded by (seed, step): the same seed gives the same text however
    the steps are split between calls.
    """
    logits = logits + banned
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    temperature = params["temperature"]
    mode = params["sample_mode"]
    at_boundary = tf.gather(boundary, prev)
    sample_rows = tf.logical_or(tf.equal(mode, SAMPLE),
                                tf.logical_and(tf.equal(mode, SAMPLE_AT_BOUNDARIES), at_boundary))
    sample_rows = tf.logical_and(sample_rows, temperature > 0.0)

    def sampled() -> tf.Tensor:
        scaled = logits / tf.maximum(temperature, 1e-6)
        scaled = truncate_logits(scaled, params["top_k"], params["top_p"])
        seed = tf.stack([tf.cast(params["seed"], tf.int64), tf.cast(step, tf.int64)])
        draw = tf.random.stateless_categorical(scaled, 1, seed=seed, dtype=tf.int32)[:, 0]
        return tf.where(sample_rows, draw, greedy)

    return tf.cond(tf.reduce_any(sample_rows), sampled, lambda: greedy)


def encode(text: str, metadata: contract.Metadata) -> list[int]:
    """Token ids of `text`, normalised as the corpus was; unknown pieces map to `<unk>`."""
    return tokenizer_from_metadata(metadata).encode(text)


def decode(ids: Sequence[int], metadata: contract.Metadata) -> str:
    """Text of token ids, spaced and UTF-8-decoded as the tokenizer does."""
    return tokenizer_from_metadata(metadata).decode(ids)


def default_prime(metadata: contract.Metadata) -> list[int]:
    """A neutral start for unconditioned samples: a line break if the vocabulary has one."""
    for token in (contract.NEWLINE, contract.EOS):
        if token in metadata.vocab:
            return [metadata.vocab.index(token)]
    return [ord("\n")] if metadata.tokenizer == "byte" else [0]


def boundary_mask(vocab: Sequence[str], language_model: str) -> np.ndarray:
    """bool [V]: tokens after which sample mode 2 samples (whitespace; every word for word models)."""
    if language_model == "word":
        return np.ones(len(vocab), bool)
    if language_model == "byte":
        return np.array([i in (9, 10, 13, 32) for i in range(len(vocab))])
    if language_model in contract.SUBWORD_TOKENIZERS:
        # Pieces carry the space before a word ("▁the"): a word ends after a piece ending in
        # whitespace, or after a line break.
        return np.array([token.replace(SPACE_MARK, " ")[-1:].isspace() for token in vocab])
    return np.array([token.isspace() for token in vocab])


def banned_logits(vocab_size: int, unk_id: int | None, no_unk: bool) -> np.ndarray:
    """float32 [V] added to the logits: -inf for tokens that must never be generated."""
    banned = np.zeros(vocab_size, np.float32)
    if no_unk and unk_id is not None:
        banned[unk_id] = _NEG_INF
    return banned


def options_as_tensors(options: SamplingOptions) -> dict[str, tf.Tensor]:
    """Scalars as tensors, so the compiled functions trace once, not once per value."""
    return {
        "temperature": tf.constant(options.temperature, tf.float32),
        "sample_mode": tf.constant(options.sample_mode, tf.int32),
        "top_k": tf.constant(options.top_k, tf.int32),
        "top_p": tf.constant(options.top_p, tf.float32),
        "seed": tf.constant(options.seed, tf.int64),
    }


def prime_model(model: LanguageModel, prime_ids: tf.Tensor, batch_size: tf.Tensor
                ) -> tuple[tf.Tensor, State, tf.Tensor]:
    """Runs the prime once for `batch_size` identical rows: (last logits [B, V], state, last token [B]).

    One single-token step per prime token, like generation itself: the step has a static shape
    (the fused kernels need a known window length, and a prime's length is only known at run
    time), and priming and generating then round identically everywhere (babble, serve, export).
    """
    tokens = tf.tile(tf.reshape(tf.cast(prime_ids, tf.int32), [1, -1]), [batch_size, 1])

    def column(i: tf.Tensor) -> tf.Tensor:  # [B, 1] with the 1 known statically
        return tf.reshape(tokens[:, i], [-1, 1])

    def step(i, logits, state):
        step_logits, state = model(column(i), state, training=False)
        return i + 1, step_logits[:, -1], state

    state = model.initial_state(batch_size)
    logits, state = model(column(0), state, training=False)
    if tokens.shape[1] == 1:  # a one-token prime (the trainer's samples): no loop to trace
        return logits[:, -1], state, tokens[:, -1]
    _, logits, state = tf.while_loop(lambda i, *_: i < tf.shape(tokens)[1], step,
                                     (tf.constant(1), logits[:, -1], state))
    return logits, state, tokens[:, -1]


def generation_loop(model: LanguageModel, logits: tf.Tensor, state: State, prev: tf.Tensor,
                    first_step: tf.Tensor, length: tf.Tensor, params: dict[str, tf.Tensor],
                    boundary: tf.Tensor, banned: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, State, tf.Tensor]:
    """`length` tokens, one model step each with the state carried: never re-runs the prefix.

    Returns (tokens int32 [B, length], logits, state, last token) so a caller can continue.
    """
    def body(i, logits, state, prev, out):
        token = choose_next(logits, prev, first_step + i, params, boundary, banned)
        step_logits, state = model(token[:, None], state, training=False)
        return i + 1, step_logits[:, -1], state, token, out.write(i, token)

    out = tf.TensorArray(tf.int32, size=length)
    _, logits, state, prev, out = tf.while_loop(
        lambda i, *_: i < length, body, (tf.constant(0), logits, state, prev, out))
    return tf.transpose(out.stack()), logits, state, prev


def _portable_function(fn: Callable) -> Callable:
    """tf.function tracing `fn` with TensorFlow's own kernels: the exported SavedModel can only use
    those, and babble, serve and the SavedModel give the same text for the same seed. Without
    AutoGraph: the loops are tf.while_loop already, and converting the model's Python only costs
    tracing time (trainer.export's signatures are traced the same way)."""

    def traced(*args: object) -> object:
        with kernels.portable():
            return fn(*args)

    return tf.function(traced, reduce_retracing=True, autograph=False)


class Generator:
    """Fast generation from one model: prime once, then the compiled loop, several samples as rows.

    `vocab` and `language_model` are needed for sample mode 2 (word boundaries) and `no_unk`;
    without them every mode but 2 works (the trainer's periodic samples need nothing more).
    """

    def __init__(self, model: LanguageModel, vocab: Sequence[str] | None = None,
                 language_model: str | None = None, unk_id: int | None = None) -> None:
        self.model, self.unk_id = model, unk_id
        self.boundary = (tf.constant(boundary_mask(vocab, language_model))
                         if vocab is not None and language_model is not None else None)
        self._prime = _portable_function(lambda ids, batch: prime_model(model, ids, batch))
        self._loop = _portable_function(lambda *args: generation_loop(model, *args))

    def stream(self, prime_ids: Sequence[int], length: int, options: SamplingOptions,
               batch_size: int = 1, chunk: int = STREAM_CHUNK, first_chunk: int | None = None
               ) -> Iterator[np.ndarray]:
        """Yields int32 [batch_size, n] blocks of new tokens, `length` in all, as they are made:
        blocks of `chunk` tokens, or from `first_chunk` tokens doubling up to `chunk` (the first
        text soon, then fewer calls)."""
        if len(prime_ids) == 0:
            raise ValueError("generation needs a non-empty prime (see default_prime)")
        params = options_as_tensors(options.validate())
        logits, state, prev = self._prime(tf.constant(prime_ids, tf.int32), tf.constant(batch_size))
        vocab_size = int(logits.shape[-1])
        boundary = self.boundary
        if boundary is None:
            if options.sample_mode == SAMPLE_AT_BOUNDARIES:
                raise ValueError("sample mode 2 needs Generator(model, vocab, language_model)")
            boundary = tf.zeros([vocab_size], tf.bool)
        banned = tf.constant(banned_logits(vocab_size, self.unk_id, options.no_unk))
        done = 0
        while done < length:
            n = min(first_chunk or chunk, length - done)
            first_chunk = min(2 * first_chunk, chunk) if first_chunk else None
            tokens, logits, state, prev = self._loop(
                logits, state, prev, tf.constant(done), tf.constant(n), params, boundary, banned)
            done += n
            yield tokens.numpy()

    def generate(self, prime_ids: Sequence[int], length: int, options: SamplingOptions,
                 batch_size: int = 1) -> np.ndarray:
        """int32 [batch_size, length]: the whole sequence in one compiled call."""
        blocks = list(self.stream(prime_ids, length, options, batch_size, chunk=max(length, 1)))
        return np.concatenate(blocks, axis=1) if blocks else np.zeros([batch_size, 0], np.int32)


class Sampler:
    """The trainer's periodic samples: plain temperature sampling on top of `Generator`."""

    def __init__(self, model: LanguageModel) -> None:
        self.generator = Generator(model)

    def generate(self, prime: list[int], length: int, temperature: float = 1.0, seed: int = 0) -> list[int]:
        """`length` new token ids following `prime` (temperature 0: greedy argmax)."""
        # Training passes seed + step, which passes MAX_SEED for a --seed near it: fold it into
        # the range a seed tensor holds rather than stop training over a sample.
        options = SamplingOptions(temperature=temperature, seed=seed % (MAX_SEED + 1))
        return self.generator.generate(prime, length, options)[0].tolist()


# --------------------------------------------------------------------------- text in, text out


@dataclasses.dataclass(frozen=True)
class Prime:
    """A prime as the model sees it: token ids, and the pieces that were not in the vocabulary."""

    ids: list[int]
    unknown: list[str]


class TextGenerator:
    """Text to text for one trained model: what babble, serve and the pipeline call.

    Each sample starts with the prime as given, followed by the generated text. Text is decoded
    incrementally (byte models hold back incomplete UTF-8; word models place spaces).
    """

    def __init__(self, model: LanguageModel, metadata: contract.Metadata) -> None:
        self.metadata = metadata
        self.tokenizer = tokenizer_from_metadata(metadata)
        self.generator = Generator(model, metadata.vocab, metadata.tokenizer, metadata.unk_id)

    def encode_prime(self, prime: str) -> Prime:
        """Prime text to ids, normalised as the corpus was (NFC, LF, lowercase if the data is);
        unknown pieces become `<unk>` (dropped if the vocabulary has none).

        An empty prime starts from a line break, as a new paragraph would.
        """
        if not prime:
            return Prime(default_prime(self.metadata), [])
        if self.tokenizer.byte_fallback:  # byte, bpe, unigram: every prime encodes, nothing unknown
            return Prime(self.tokenizer.encode(prime), [])
        index = {token: i for i, token in enumerate(self.tokenizer.vocab)}
        # Not tokenizer.encode: the pieces left out of the vocabulary are reported to the user.
        pieces = self.tokenizer.pieces(cleaning.normalize(prime, self.metadata.lowercase))
        unknown = [piece for piece in pieces if piece not in index]
        unk = self.tokenizer.unk_id
        ids = [index.get(piece, unk) for piece in pieces if piece in index or unk is not None]
        return Prime(ids or default_prime(self.metadata), unknown)

    def stream(self, prime: str, length: int, options: SamplingOptions, num_samples: int = 1,
               chunk: int = STREAM_CHUNK) -> Iterator[list[str]]:
        """Yields one text piece per sample: first the prime, then the text of each block of tokens."""
        yield [prime] * num_samples
        for block in self.stream_tokens(self.encode_prime(prime).ids, length, options, num_samples, chunk):
            yield ["".join(pieces) for pieces in block]

    def stream_tokens(self, prime_ids: Sequence[int], length: int, options: SamplingOptions,
                      num_samples: int = 1, chunk: int = STREAM_CHUNK, first_chunk: int | None = None
                      ) -> Iterator[list[list[str]]]:
        """Per block of generated tokens, per sample, the text each token adds ("" while a byte
        model holds back incomplete UTF-8; what is held at the end comes with the last token).
        Token-level text lets a caller stop at a stop string and count the tokens it took.
        `chunk` and `first_chunk` as in `Generator.stream`."""
        decoders = [self.tokenizer.decoder() for _ in range(num_samples)]
        for decoder in decoders:
            for token in prime_ids:  # so spacing and UTF-8 continue from the prime
                decoder.push(token)
        done = 0
        for block in self.generator.stream(prime_ids, length, options, num_samples, chunk, first_chunk):
            pieces = [[decoder.push(int(t)) for t in row]
                      for decoder, row in zip(decoders, block, strict=True)]
            done += block.shape[1]
            if done == length:  # the last block carries what the decoders still hold
                for decoder, row in zip(decoders, pieces, strict=True):
                    if hasattr(decoder, "flush") and row:
                        row[-1] += decoder.flush()
            yield pieces

    def generate(self, prime: str, length: int, options: SamplingOptions, num_samples: int = 1) -> list[str]:
        """`num_samples` texts, each the prime followed by `length` generated tokens."""
        texts = [""] * num_samples
        for pieces in self.stream(prime, length, options, num_samples, chunk=max(length, 1)):
            texts = [text + piece for text, piece in zip(texts, pieces, strict=True)]
        return texts

"""`python -m trainer.export`: a self-contained SavedModel for serving (TF Serving, Vertex AI).

    python -m trainer.export --job-dir job/NAME [--best] [--export_dir DIR]

The SavedModel holds the weights, the vocabulary (string constants and a lookup table) and
tokenization as TensorFlow ops, so it loads with plain `tf.saved_model.load` and no verne.
Every signature runs `trainer.sampling.generation_loop`, the code babble and serve run, so the
same seed gives the same tokens.

- `serving_default` (for TF Serving and Vertex AI): every input is a vector with one value per
  instance — prime (string), length, temperature, top_k, top_p, seed (int64), sample_mode,
  no_unk (bool) — and the outputs are `text` [B] (each the prime followed by the generated
  text) and `tokens` [B, max length] (-1 past a row's own length). Each instance is generated
  alone with its own values, one after another: exactly what `generate` gives it with
  num_samples 1. Every input is required (signatures have no defaults). A Vertex AI prediction
  request (TF Serving's row format, each field stacked along the batch dimension)::

      {"instances": [
        {"prime": "The ", "length": 200, "temperature": 0.8, "top_k": 0, "top_p": 1.0,
         "seed": 7, "sample_mode": 1, "no_unk": false}]}

  answers `{"predictions": [{"text": "The ...", "tokens": [...]}]}`. For more samples of one
  prime, send more instances with other seeds.
- `generate`: the same with scalar inputs plus num_samples, for Python (see
  `generate_with_saved_model`) or TF Serving's columnar format (`{"inputs": {...}}`):
  `text` [num_samples], `tokens` [num_samples, length].
- `next_token_log_probs`: prime [B] -> `log_probs` [B, V] for the token after each prime, and
  `vocab` [B, V] (the vocabulary, repeated per row because the row format splits every output
  by instance); `{"signature_name": "next_token_log_probs", "instances": [{"prime": "The"}]}`.

From Python, without verne::

    loaded = tf.saved_model.load(export_dir)
    out = loaded.signatures["serving_default"](
        prime=tf.constant(["The "]), length=tf.constant([200]), temperature=tf.constant([0.8]),
        top_k=tf.constant([0]), top_p=tf.constant([1.0]), seed=tf.constant([7], tf.int64),
        sample_mode=tf.constant([1]), no_unk=tf.constant([False]))
    out["text"][0].numpy().decode("utf-8")

Tokenization in TF: newlines, Unicode NFC (`trainer.graph_nfc`) and case are normalised as the
corpus was, so a prime gets the ids babble and serve give it; char primes are split into code
points, byte primes into bytes, word primes with an RE2 translation of
`preprocessing.tokenizers.WORD_PATTERN` (or of `WHITESPACE_PATTERN` for data preprocessed with
`--word_split whitespace`), bpe/unigram primes by `trainer.graph_subword` (SentencePiece's
algorithms on the learned pieces in plain TF ops: the tokenizer's own ids, no tensorflow-text
needed). BPE's merge loop costs the square of the prime's length, so a bpe export takes primes of
up to MAX_BPE_PRIME_CHARS characters and answers a longer one with InvalidArgument, which TF
Serving and Vertex AI return as HTTP 400 with its message. Byte output, and byte pieces of
bpe/unigram output, that is not valid UTF-8 becomes U+FFFD. Word output is spaced with regular
expressions implementing the tokenizer's rules except the alternation of straight quotes
(whitespace-split models: single spaces between tokens, none around line breaks).
Training writes one to JOB_DIR/export at its end (see trainer.runner).
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable

import tensorflow as tf
from absl import app, flags

from preprocessing import contract, subword
from trainer import checkpoints, errors, kernels, storage
from trainer.errors import run_cli
from trainer.flags import define_best_flag, define_hparams_flags, hparams_from_command_line
from trainer.graph_nfc import GraphNFC
from trainer.graph_subword import SubwordGraph
from trainer.models.base import LanguageModel
from trainer.sampling import banned_logits, boundary_mask, default_prime, generation_loop, prime_model

EXPORT_DIR = "export"
EXPORTING = "exporting the model"  # what the retries' log lines say (trainer.storage)
BEST_EXPORT_DIR = "export-best"
# serving_default's inputs, in order: each [None], one value per instance.
ROW_INPUTS = (("prime", tf.string), ("length", tf.int32), ("temperature", tf.float32),
              ("top_k", tf.int32), ("top_p", tf.float32), ("seed", tf.int64),
              ("sample_mode", tf.int32), ("no_unk", tf.bool))

# preprocessing.tokenizers.WORD_PATTERN in RE2: Python's Unicode \w, \d and \s become
# explicit Unicode classes (RE2's shorthands are ASCII-only).
_SPACE = r"\s\x0b\x1c-\x1f\x{85}\p{Z}"
WORD_PATTERN_RE2 = (r"<unk>|<eos>|\n|\p{Nd}+(?:[.,:]\p{Nd}+)+|[\pL\pN]+(?:['’][\pL\pN]+)*"
                    rf"|[^\pL\pN_{_SPACE}]|_")
# preprocessing.tokenizers.WHITESPACE_PATTERN: runs of what str.split() keeps, and newlines.
WHITESPACE_PATTERN_RE2 = rf"\n|[^{_SPACE}]+"
_SEPARATOR = "\x00"
# The longest prime (characters, after normalisation) a bpe export takes: the in-graph BPE
# merges one pair per loop step over the whole prime, so its cost grows with the square of
# the length (measured on 2 cores: 35 ms at 1,000 characters, 131 ms at 2,000, 482 ms at
# 4,000). 2,000 is also trainer.serve's default --max_prime_chars. Unigram is linear (17 ms
# at 1,000, 66 ms at 4,000) and has no cap.
MAX_BPE_PRIME_CHARS = 2000
# tokenizers._WordDecoder's spacing, as substitutions on tokens joined by single spaces.
_WORD_SPACING = (
    (r" ([.,;:!?)\]}%’”»…])", r"\1"),
    (r"([(\[{‘“«¿¡]) ", r"\1"),
    (r" ?([-–—/]) ?", r"\1"),
    (r" ?\n ?", "\n"),
)
# By metadata.word_split: the RE2 pattern and the spacing (tokenizers._SpaceDecoder's for
# pre-tokenized text: single spaces, none around line breaks).
_WORD_SPLITS_RE2 = {"pattern": (WORD_PATTERN_RE2, _WORD_SPACING),
                    "whitespace": (WHITESPACE_PATTERN_RE2, _WORD_SPACING[-1:])}


class GenerationModule(tf.Module):
    """The exported object: a model, its vocabulary and the serving functions."""

    def __init__(self, model: LanguageModel, metadata: contract.Metadata) -> None:
        super().__init__(name="verne")
        vocab = list(metadata.vocab)
        # The weights are tracked (so they are saved); the Keras model itself is not, because
        # Keras would add its own serving function, which our (tokens, state) call cannot have.
        self.weights = list(model.variables)
        # The prime's ids and the model primed with them, one graph that generate and
        # next_token_log_probs both call: each trace of the model's steps costs the export time.
        primed = tf.function(self._primed, autograph=False, input_signature=[
            tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32)])
        self._untracked = _Untracked(model, primed)
        self.kind, self.lowercase = metadata.tokenizer, metadata.lowercase
        self.word_split = metadata.word_split
        self.vocab = tf.constant(vocab)
        self.vocab_size = len(vocab)
        self.token_text = tf.constant(_token_texts(metadata))
        self.boundary = tf.constant(boundary_mask(vocab, metadata.tokenizer))
        self.start = tf.constant(default_prime(metadata), tf.int32)
        self.unk_banned = tf.constant(banned_logits(len(vocab), metadata.unk_id, no_unk=True))
        keys, values = _lookup_entries(metadata)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, tf.constant(values, tf.int32)),
            default_value=-1 if metadata.unk_id is None else metadata.unk_id)
        self.nfc = GraphNFC()
        if metadata.learned:  # bpe/unigram: the learned tokenizer's pieces and scores as tables
            learned = subword.SubwordTokenizer(metadata.tokenizer, metadata.tokenizer_model, metadata.vocab)
            self.subword = SubwordGraph(learned.piece_table())

    @tf.function(input_signature=[
        tf.TensorSpec([], tf.string, name="prime"), tf.TensorSpec([], tf.int32, name="length"),
        tf.TensorSpec([], tf.float32, name="temperature"), tf.TensorSpec([], tf.int32, name="top_k"),
        tf.TensorSpec([], tf.float32, name="top_p"), tf.TensorSpec([], tf.int64, name="seed"),
        tf.TensorSpec([], tf.int32, name="sample_mode"), tf.TensorSpec([], tf.int32, name="num_samples"),
        tf.TensorSpec([], tf.bool, name="no_unk")], autograph=False)
    def generate(self, prime: tf.Tensor, length: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor,
                 top_p: tf.Tensor, seed: tf.Tensor, sample_mode: tf.Tensor, num_samples: tf.Tensor,
                 no_unk: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._generate(prime, length, temperature, top_k, top_p, seed, sample_mode,
                              num_samples, no_unk)

    @tf.function(input_signature=[tf.TensorSpec([None], dtype, name=name) for name, dtype in ROW_INPUTS],
                 autograph=False)
    def generate_rows(self, prime: tf.Tensor, length: tf.Tensor, temperature: tf.Tensor,
                      top_k: tf.Tensor, top_p: tf.Tensor, seed: tf.Tensor, sample_mode: tf.Tensor,
                      no_unk: tf.Tensor) -> dict[str, tf.Tensor]:
        """One text per row, each exactly what `generate` gives that row's values alone.

        Rows run one after another: their primes and lengths differ, and a row alone keeps
        the same-seed-same-text promise with babble. `tokens` is padded with -1 to the longest row.
        """
        inputs = (prime, length, temperature, top_k, top_p, seed, sample_mode, no_unk)
        rows = tf.shape(prime)[0]
        checks = [tf.debugging.assert_positive(rows, message="send at least one instance")]
        checks += [tf.debugging.assert_equal(tf.shape(x)[0], rows, message="every input needs one value "
                                             "per instance") for x in inputs[1:]]
        with tf.control_dependencies(checks):
            width = tf.reduce_max(length)

        def row(i, texts, tokens):
            # A call of `generate`'s traced graph: tracing the model's steps again would cost the
            # export seconds.
            out = self.generate(prime[i], length[i], temperature[i], top_k[i], top_p[i], seed[i],
                                sample_mode[i], tf.constant(1), no_unk[i])
            padded = tf.pad(out["tokens"][0], [[0, width - length[i]]], constant_values=-1)
            return i + 1, texts.write(i, out["text"][0]), tokens.write(i, padded)

        texts = tf.TensorArray(tf.string, size=rows, element_shape=[])
        tokens = tf.TensorArray(tf.int32, size=rows, element_shape=[None])
        _, texts, tokens = tf.while_loop(lambda i, *_: i < rows, row, (tf.constant(0), texts, tokens))
        return {"text": texts.stack(), "tokens": tokens.stack()}

    def _generate(self, prime: tf.Tensor, length: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor,
                  top_p: tf.Tensor, seed: tf.Tensor, sample_mode: tf.Tensor, num_samples: tf.Tensor,
                  no_unk: tf.Tensor) -> dict[str, tf.Tensor]:
        checks = [tf.debugging.assert_positive(length, message="length must be at least 1"),
                  tf.debugging.assert_positive(num_samples, message="num_samples must be at least 1")]
        with tf.control_dependencies(checks):
            ids, logits, state, prev = self._untracked.primed(prime, num_samples)
        params = {"temperature": temperature, "sample_mode": sample_mode, "top_k": top_k,
                  "top_p": top_p, "seed": seed}
        banned = tf.where(no_unk, self.unk_banned, tf.zeros_like(self.unk_banned))
        tokens, _, _, _ = generation_loop(self._untracked.model, logits, state, prev, tf.constant(0), length,
                                          params, self.boundary, banned)
        return {"text": prime + self.detokenize(tokens, ids[-1]), "tokens": tokens}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prime")], autograph=False)
    def next_token_log_probs(self, prime: tf.Tensor) -> dict[str, tf.Tensor]:
        """Per row: `log_probs` [V] of the token after that row's prime and the `vocab` [V] (repeated
        per row, because TF Serving's row format splits every output by instance)."""
        def row(i, out):
            _, logits, _, _ = self._untracked.primed(prime[i], tf.constant(1))
            return i + 1, out.write(i, tf.nn.log_softmax(logits[0]))

        rows = tf.shape(prime)[0]
        out = tf.TensorArray(tf.float32, size=rows, element_shape=[self.vocab_size])
        _, out = tf.while_loop(lambda i, _: i < rows, row, (tf.constant(0), out))
        return {"log_probs": out.stack(), "vocab": tf.tile(self.vocab[None], [rows, 1])}

    def _primed(self, prime: tf.Tensor, batch_size: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """(ids [P], logits [B, V], state, last token [B]): `prime_model` on the prime's ids."""
        ids = self.prime_ids(prime)
        return (ids, *prime_model(self._untracked.model, ids, batch_size))

    def prime_ids(self, prime: tf.Tensor) -> tf.Tensor:
        """int32 [P]: the prime's token ids (unknown pieces -> <unk>); a line break if empty.

        Newlines, NFC and case are normalised as the corpus was, for byte models too (as
        `Tokenizer.encode` does), so a prime means here what it means to babble.
        """
        text = self.nfc.normalize(tf.strings.regex_replace(prime, "\r\n?", "\n"))
        if self.kind == "bpe":
            length = tf.strings.length(text, unit="UTF8_CHAR")
            with tf.control_dependencies([tf.debugging.assert_less_equal(
                    length, MAX_BPE_PRIME_CHARS, message=f"prime is longer than {MAX_BPE_PRIME_CHARS} "
                    "characters, the most this bpe export takes (the cost of its in-graph tokenizer "
                    "grows with the square of the prime length); send at most the last "
                    f"{MAX_BPE_PRIME_CHARS} characters")]):
                text = tf.identity(text)
        if self.lowercase:
            text = tf.strings.lower(text, encoding="utf-8")
        if self.kind == "byte":
            ids = tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32)
        elif self.kind in contract.SUBWORD_TOKENIZERS:
            ids = self.subword.encode(text)
        else:
            pieces = (tf.strings.unicode_split(text, "UTF-8") if self.kind == "char"
                      else word_pieces(text, _WORD_SPLITS_RE2[self.word_split][0]))
            ids = self.table.lookup(pieces)
            ids = tf.boolean_mask(ids, ids >= 0)  # unknown pieces when there is no <unk>
        return tf.cond(tf.size(ids) > 0, lambda: ids, lambda: self.start)

    def detokenize(self, tokens: tf.Tensor, last_prime_id: tf.Tensor) -> tf.Tensor:
        """string [B]: the text of generated tokens [B, L] following the prime's last token."""
        if self.kind in contract.SUBWORD_TOKENIZERS:
            return self.subword.decode(tokens)
        texts = tf.gather(self.token_text, tokens)
        if self.kind == "char":
            return tf.strings.reduce_join(texts, axis=-1)
        if self.kind == "byte":
            joined = tf.strings.reduce_join(texts, axis=-1)
            return tf.strings.unicode_transcode(joined, "UTF-8", "UTF-8", errors="replace")
        # Words: space them after the prime's last token (it decides the first space), then cut it.
        head = tf.gather(self.token_text, last_prime_id)
        heads = tf.fill([tf.shape(tokens)[0]], head)
        joined = tf.strings.reduce_join(tf.concat([heads[:, None], texts], axis=1), axis=-1, separator=" ")
        for pattern, rewrite in _WORD_SPLITS_RE2[self.word_split][1]:
            joined = tf.strings.regex_replace(joined, pattern, rewrite)
        return tf.strings.substr(joined, tf.strings.length(head), -1)


@dataclasses.dataclass(frozen=True)
class _Untracked:
    model: LanguageModel
    primed: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, ...]]


def word_pieces(text: tf.Tensor, pattern: str = WORD_PATTERN_RE2) -> tf.Tensor:
    """string [N]: `tokenizers.word_pieces` of a scalar string, in TF ops (RE2)."""
    marked = tf.strings.regex_replace(text, f"({pattern})", rf"{_SEPARATOR}\1{_SEPARATOR}")
    pieces = tf.strings.split(marked, _SEPARATOR)
    blank = tf.strings.regex_full_match(pieces, f"[{_SPACE}]*")
    return tf.boolean_mask(pieces, tf.logical_or(tf.equal(pieces, "\n"), tf.logical_not(blank)))


def _token_texts(metadata: contract.Metadata) -> list[bytes] | list[str]:
    """What each id prints as: the byte itself for byte models, a line break for <eos>."""
    if metadata.tokenizer == "byte":
        return [bytes([b]) for b in range(256)]
    return ["\n" if token == contract.EOS else token for token in metadata.vocab]


def _lookup_entries(metadata: contract.Metadata) -> tuple[list[str], list[int]]:
    keys, values = list(metadata.vocab), list(range(metadata.vocab_size))
    if metadata.line_eos and contract.EOS in metadata.vocab and contract.NEWLINE not in metadata.vocab:
        keys.append(contract.NEWLINE)
        values.append(metadata.vocab.index(contract.EOS))
    return keys, values


def export_model(model: LanguageModel, metadata: contract.Metadata, export_dir: str) -> str:
    """Writes the SavedModel to `export_dir`, replacing an older export only once complete.

    On gs:// each step (the write under a temporary name, each rename, the removal of the older
    export) is retried on its own through Cloud Storage faults (trainer.storage): a step that
    failed halfway is taken up where it stopped, so nothing is written twice or half-written."""
    module = GenerationModule(model, metadata)
    signatures = {"serving_default": module.generate_rows, "generate": module.generate,
                  "next_token_log_probs": module.next_token_log_probs}
    staging = f"{export_dir.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"

    def save() -> None:
        with kernels.portable():  # verne's C++ ops would tie the SavedModel to this machine and verne
            tf.saved_model.save(module, staging, signatures=signatures)

    def drop_staging() -> None:  # a half-written export is never left behind
        storage.remove_tree(staging)

    try:
        storage.retry(EXPORTING, export_dir, save, before_retry=drop_staging)
    except BaseException:
        with contextlib.suppress(tf.errors.OpError):  # the store may still be down: keep the first error
            drop_staging()
        raise
    _replace_dir(staging, export_dir)
    return export_dir


def _replace_dir(staging: str, final: str) -> None:
    """`staging` becomes `final`; an older `final` is moved aside first, and put back if the move
    fails for good before any of it was made (a directory on gs:// is moved object by object, so
    not atomically)."""
    old = None
    if storage.retry(EXPORTING, final, lambda: tf.io.gfile.exists(final)):
        old = f"{final.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
        _move(final, old)
    try:
        _move(staging, final)
    except BaseException:
        if old is not None:
            with contextlib.suppress(tf.errors.OpError, storage.StorageError):
                if not tf.io.gfile.exists(final):
                    _move(old, final)
        raise
    if old is not None:
        try:
            storage.retry(EXPORTING, old, lambda: storage.remove_tree(old))
        except storage.StorageError as err:  # the new export is complete: only a leftover remains
            errors.warn(f"{final} is written, but the older export moved aside could not be removed "
                        f"({err}); delete {old} by hand")


def _move(source: str, target: str) -> None:
    """Renames a directory, retried; a retry takes up a move that stopped halfway (what is left of
    `source` goes on into `target`) or that finished though its answer was lost."""
    def move() -> None:
        if not tf.io.gfile.exists(source) and tf.io.gfile.exists(target):
            return
        tf.io.gfile.rename(source, target, overwrite=True)

    storage.retry(EXPORTING, target, move)


def export_job(job_dir: str, best: bool = False, export_dir: str | None = None) -> str:
    """Exports the latest (or best) checkpoint of a concrete job dir; returns the export dir."""
    _, metadata, model = checkpoints.load_job(job_dir, best=best)
    target = export_dir or checkpoints.join(job_dir, BEST_EXPORT_DIR if best else EXPORT_DIR)
    with errors.writing(f"--export_dir={target}" if export_dir else f"--job-dir={job_dir}"):
        return export_model(model, metadata, target)


def generate_with_saved_model(loaded: object, prime: str, length: int, *, temperature: float = 1.0,
                              top_k: int = 0, top_p: float = 1.0, seed: int = 1, sample_mode: int = 1,
                              num_samples: int = 1, no_unk: bool = False) -> list[str]:
    """Convenience for Python callers of a loaded export (what a client would send)."""
    out = loaded.signatures["generate"](
        prime=tf.constant(prime), length=tf.constant(length, tf.int32),
        temperature=tf.constant(temperature, tf.float32), top_k=tf.constant(top_k, tf.int32),
        top_p=tf.constant(top_p, tf.float32), seed=tf.constant(seed, tf.int64),
        sample_mode=tf.constant(sample_mode, tf.int32), num_samples=tf.constant(num_samples, tf.int32),
        no_unk=tf.constant(no_unk))
    return [text.decode("utf-8") for text in out["text"].numpy()]


def define_flags() -> None:
    """The hyperparameter flags (so --job-dir may hold %JOB%) plus export's own. Idempotent."""
    if "export_dir" in flags.FLAGS:
        return
    define_hparams_flags()
    define_best_flag()
    flags.DEFINE_string("export_dir", "", "Where to write the SavedModel (default JOB_DIR/export).")


@run_cli
def main(argv: list[str]) -> int:
    hparams = hparams_from_command_line(argv)
    job_dir = checkpoints.resolve_job_dir(hparams)
    path = export_job(job_dir, flags.FLAGS.best, flags.FLAGS.export_dir or None)
    print(f"exported {job_dir} -> {path} (signatures: serving_default, generate, "
          "next_token_log_probs)", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)

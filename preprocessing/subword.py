"""Subword tokenizers (`bpe`, `unigram`): learned from the training split with SentencePiece.

One module for learning, encoding and decoding; the Beam job, the trainer (primes, samples) and
the export's in-graph tokenizer (`trainer.graph_subword`, which reads `piece_table` here) all go
through it. No Beam or TensorFlow at import.

Why SentencePiece and not Hugging Face `tokenizers`:
- the export must tokenize inside the TensorFlow graph without verne. tensorflow-text has a
  SentencePiece op, but its wheel requires the full `tensorflow` package (not `tensorflow-cpu`),
  so it cannot join verne's environment with `pip check` clean; the graph tokenizer is therefore
  written in plain TF ops, and SentencePiece's model is the simpler one to re-implement: one
  list of pieces with one score each, BPE applying merges by score and unigram a Viterbi over
  the same scores, with byte fallback built in (unknown characters become `<0xNN>` pieces);
- both BPE and unigram come from one library with no dependencies (`tokenizers` brings
  `huggingface-hub` and its closure);
- measured once on tinyshakespeare (1.1 MB, 2,000 pieces, a busy 2-core machine: indicative
  only), it is as good and no slower: learning BPE 0.14 s vs 0.27 s (`tokenizers`' byte-level
  BPE), unigram 2.5 s vs 2.1 s; encoding the corpus BPE 0.31 s vs 0.54 s, unigram 0.04 s vs
  0.41 s; 2.81 vs 2.86 (BPE) and 2.76 vs 2.71 (unigram) characters per token.

Settings, and why:
- `normalization_rule_name="identity"`, `remove_extra_whitespaces=False`,
  `add_dummy_prefix=False`: preprocessing.cleaning has already normalised the text (NFC, LF,
  case); SentencePiece must not change it further, or decode(encode(text)) would not be text.
  Without the dummy prefix, encoding is also the same whether a text is encoded whole or in
  pieces cut at line starts.
- `byte_fallback=True`: any text round-trips; characters never seen become UTF-8 byte pieces.
- the newline is a user-defined piece: SentencePiece learns from lines, so without it every line
  break would cost a byte-fallback piece and never be a piece of its own.
- no `<s>`/`</s>`/`<pad>`: records are long contiguous runs, as for the other tokenizers.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from preprocessing import contract
from preprocessing.tokenizers import Decoder, Tokenizer

KINDS = contract.SUBWORD_TOKENIZERS
# What SentencePiece writes for a space inside pieces ("▁the").
SPACE_MARK = "\u2581"
# What an `<unk>` id prints as (byte fallback means the encoder never produces it; a sampled
# one still needs a printable form). SentencePiece's own default surface.
UNK_SURFACE = " \u2047 "
# Lines longer than this are cut for learning: SentencePiece skips sentences above its
# max_sentence_length instead of learning from them, and some books keep a paragraph per line.
MAX_LINE_CHARS = 4096
# Characters covered by ordinary pieces; the rarest 0.05% become byte pieces, so one stray
# alphabet in a book does not spend hundreds of the vocabulary's entries (SentencePiece's default).
CHARACTER_COVERAGE = 0.9995
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


class LearnError(ValueError):
    """The text cannot give the tokenizer asked for; the message says why and what to change."""


def learn(kind: str, texts: Iterable[str], vocab_size: int) -> bytes:
    """A serialized SentencePiece model of `vocab_size` pieces learned from `texts`."""
    import sentencepiece as spm  # deferred: only jobs that learn a tokenizer pay for it

    if kind not in KINDS:
        raise ValueError(f"subword tokenizer must be one of {KINDS}, got {kind!r}")
    lines = list(_learning_lines(texts))
    if not lines:
        raise LearnError("the training split has no text to learn a tokenizer from; give training "
                         "files with text (--input or --train)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type=kind, vocab_size=vocab_size,
            byte_fallback=True, character_coverage=CHARACTER_COVERAGE,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            user_defined_symbols=[contract.NEWLINE], allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, unk_surface=UNK_SURFACE,
            max_sentence_length=4 * MAX_LINE_CHARS, input_sentence_size=0,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as err:
        raise _learn_error(str(err), vocab_size) from None
    return model.getvalue()


def _learning_lines(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        for line in text.split(contract.NEWLINE):
            for start in range(0, len(line), MAX_LINE_CHARS):
                yield line[start:start + MAX_LINE_CHARS]


def _learn_error(message: str, vocab_size: int) -> Exception:
    if match := _TOO_HIGH.search(message):
        return LearnError(f"--vocab_size {vocab_size} is more pieces than the training text supports "
                          f"(at most {match.group(2)}); use a smaller --vocab_size or more text")
    if match := _TOO_LOW.search(message):
        return LearnError(f"--vocab_size {vocab_size} is too small: 256 byte pieces, <unk>, the "
                          f"newline and the text's characters need at least {match.group(2)}")
    return RuntimeError(f"SentencePiece could not learn the tokenizer: {message}")


@dataclasses.dataclass(frozen=True)
class PieceTable:
    """Everything an encoder outside SentencePiece needs (the export's graph tokenizer).

    `matchable[i]`: piece i can be matched in text (not `<unk>` and not a byte piece);
    `scores[i]`: SentencePiece's score (BPE: merge priority; unigram: log probability);
    `text[i]`: the bytes id i stands for when decoding; `byte_ids[b]`: the id of byte b's piece.
    """

    kind: str
    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    matchable: tuple[bool, ...]
    text: tuple[bytes, ...]
    byte_ids: tuple[int, ...]


class SubwordTokenizer(Tokenizer):
    """Encodes and decodes with a learned SentencePiece model (`model` is its serialized bytes)."""

    # Every text round-trips through byte pieces: a prime never has unknown pieces.
    byte_fallback = True

    def __init__(self, kind: str, model: bytes, vocab: Sequence[str] | None = None,
                 lowercase: bool = False) -> None:
        import sentencepiece as spm

        if kind not in KINDS:
            raise ValueError(f"subword tokenizer must be one of {KINDS}, got {kind!r}")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model)
        except (RuntimeError, TypeError) as err:
            raise contract.ContractError(f"not a SentencePiece model ({err})") from None
        pieces = tuple(self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()))
        if vocab is not None and tuple(vocab) != pieces:
            raise contract.ContractError("the tokenizer file's pieces differ from the metadata's "
                                         "vocabulary; rerun preprocessing.run")
        super().__init__(pieces, lowercase=lowercase)
        self.kind = kind
        self.model = model
        self._text = tuple(_piece_bytes(self._sp, i, p) for i, p in enumerate(pieces))

    def pieces(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int64)

    def decoder(self) -> Decoder:
        return _PieceDecoder(self._text)

    def piece_table(self) -> PieceTable:
        sp, n = self._sp, self.vocab_size
        matchable = tuple(not (sp.is_byte(i) or sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i))
                          for i in range(n))
        byte_ids = [0] * 256
        for i, piece in enumerate(self.vocab):
            if sp.is_byte(i):
                byte_ids[_byte_value(piece)] = i
        return PieceTable(self.kind, self.vocab, tuple(sp.get_score(i) for i in range(n)), matchable,
                          self._text, tuple(byte_ids))


def _piece_bytes(sp: Any, i: int, piece: str) -> bytes:
    """What id i decodes to: its byte, the unknown surface, or the piece with "▁" as a space."""
    if sp.is_byte(i):
        return bytes([_byte_value(piece)])
    if sp.is_unknown(i):
        return UNK_SURFACE.encode("utf-8")
    return piece.replace(SPACE_MARK, " ").encode("utf-8")


def _byte_value(piece: str) -> int:
    match = _BYTE_PIECE.fullmatch(piece)
    if match is None:
        raise contract.ContractError(f"byte piece {piece!r} is not <0xNN>")
    return int(match.group(1), 16)


class _PieceDecoder:
    """Pieces to text, holding back a character whose byte pieces have not all arrived."""

    def __init__(self, text: Sequence[bytes]) -> None:
        self._text = text
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._text[token_id])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

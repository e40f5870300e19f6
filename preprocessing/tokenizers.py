"""Tokenizers shared by the Beam job (vocabulary, encoding) and the trainer (primes, samples).

Pure Python + numpy: no Beam or TensorFlow at import. Build one from metadata with
`tokenizer_from_metadata(md)`; every tokenizer has `kind`, `vocab`, `unk_id`, `encode`,
`decode`, `pieces` and `decoder()` (incremental decoding for streaming generation). The learned subword
tokenizers (bpe, unigram) live in `preprocessing.subword`; `make_tokenizer` builds them too,
from the tokenizer file's bytes.

- byte: the UTF-8 bytes of the text; vocab is `chr(b)` for b in 0..255, id = byte value, no `<unk>`.
  Lossless for any text.
- char: one token per Unicode code point (after NFC); `<unk>` is id 0, then characters by count
  (descending), ties by code point. Lossless for text whose characters are all in the vocabulary.
- word: with `word_split="pattern"`, `WORD_PATTERN` splits text into words, numbers, single
  punctuation marks and newlines; with `word_split="whitespace"` (pre-tokenized corpora), every
  run of non-whitespace is one token, exactly as awd-lstm-lm's `line.split()`, so PTB's `mr.`
  `'s` `u.s.` and WikiText's `@-@` stay whole. Spaces and tabs are never tokens. `<unk>` is
  id 0; with `line_eos` every newline becomes `<eos>` (id 1, Penn Treebank / WikiText style as in
  awd-lstm-lm), otherwise `\\n` is always kept (id 1) so generated text keeps its lines and
  paragraphs. A literal `<unk>` in pre-tokenized input is the unknown token.

What "lossless" means for word text: the token sequence survives exactly,
`pieces(decode(encode(t))) == pieces(t)` for in-vocabulary t, and the whitespace between tokens
is re-derived by `respace`'s English rules: one space between tokens, none at line starts,
none before closing punctuation (. , ; : ! ? ) ] } ’ ” …), none after opening brackets and
quotes (( [ { ‘ “), none around dashes, hyphens and slashes, straight quotes (" ' _) alternately
open and close within a paragraph. So `decode(encode(t)) == respace(t)`, and text already
spaced that way (ordinary prose) comes back byte for byte. Pre-tokenized text (" it is - ")
comes back re-spaced. With the whitespace split there are no rules to re-derive: tokens are
joined by single spaces, lines by newlines, so `decode(encode(t))` and
`respace(t, word_split="whitespace")` are t with each line's whitespace runs collapsed to one
space and trimmed.
"""

from __future__ import annotations

import codecs
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from preprocessing import cleaning, contract

# Order matters: the special tokens first, then numbers with separators (1,000 3.14 10:30),
# then words with inner apostrophes (don't, o'er, Carroll’s), then any other single symbol.
# Underscores (Gutenberg's _italics_) are symbols, so "_word_" does not become a new word.
WORD_PATTERN = re.compile(r"<unk>|<eos>|\n|\d+(?:[.,:]\d+)+|[^\W_]+(?:['’][^\W_]+)*|[^\w\s]|_")
# Python's \s is exactly str.isspace, what str.split() splits on; newlines stay tokens.
WHITESPACE_PATTERN = re.compile(r"\n|\S+")
_SPLIT_PATTERNS = {"pattern": WORD_PATTERN, "whitespace": WHITESPACE_PATTERN}

_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%’”»…")
_NO_SPACE_AFTER = frozenset("([{‘“«¿¡")
_JOINERS = frozenset("-–—/")
_SYMMETRIC_QUOTES = frozenset("\"'_")


class Decoder(Protocol):
    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a byte sequence is incomplete)."""
        ...

    def flush(self) -> str:
        """Whatever is still held at the end of a sample (an incomplete byte sequence as U+FFFD)."""
        ...


class Tokenizer:
    """Base class: `vocab[i]` is the token with id i."""

    kind: str = ""
    # True when every text encodes without <unk> (byte; bpe/unigram through byte pieces).
    byte_fallback: bool = False

    def __init__(self, vocab: Sequence[str], lowercase: bool = False, line_eos: bool = False) -> None:
        self.vocab: tuple[str, ...] = tuple(vocab)
        self.lowercase = lowercase
        self.line_eos = line_eos
        self._index = {token: i for i, token in enumerate(self.vocab)}
        self.unk_id: int | None = self._index.get(contract.UNK)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def pieces(self, text: str) -> list[str]:
        """The token strings of already-cleaned text: what the vocabulary counts."""
        raise NotImplementedError

    def count(self, text: str) -> Counter[str]:
        return Counter(self.pieces(text))

    def encode_array(self, text: str) -> np.ndarray:
        """Cleaned text → int64 ids; unknown tokens → `<unk>`."""
        index, unk = self._index, self.unk_id
        return np.fromiter((index.get(p, unk) for p in self.pieces(text)), dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        """Any text (e.g. a prime) → ids, normalised the way the corpus was (NFC, LF, case)."""
        return self.encode_array(cleaning.normalize(text, self.lowercase)).tolist()

    def decoder(self) -> Decoder:
        return _TableDecoder(self.vocab)

    def decode(self, ids: Iterable[int]) -> str:
        decoder = self.decoder()
        return "".join(decoder.push(int(i)) for i in ids) + decoder.flush()


class _TableDecoder:
    def __init__(self, vocab: Sequence[str]) -> None:
        self._vocab = vocab

    def push(self, token_id: int) -> str:
        return self._vocab[token_id]

    def flush(self) -> str:
        return ""


class ByteTokenizer(Tokenizer):
    kind = "byte"
    byte_fallback = True

    def __init__(self, vocab: Sequence[str] | None = None, lowercase: bool = False,
                 line_eos: bool = False) -> None:
        super().__init__(byte_vocab() if vocab is None else vocab, lowercase, line_eos)
        if self.vocab != byte_vocab():
            raise contract.ContractError("a byte vocabulary must be chr(0)..chr(255) in order")

    def pieces(self, text: str) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def decoder(self) -> Decoder:
        return _ByteDecoder()


class _ByteDecoder:
    """Holds an incomplete UTF-8 sequence until its last byte arrives."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(bytes((token_id,)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, vocab: Sequence[str], lowercase: bool = False, line_eos: bool = False) -> None:
        super().__init__(vocab, lowercase, line_eos)
        if self.unk_id is None:
            raise contract.ContractError(f"a char vocabulary needs {contract.UNK}")
        # A code point → id table makes encoding a numpy gather instead of a Python loop.
        points = [ord(c) for c in self.vocab if len(c) == 1]
        self._table = np.full(max(points, default=0) + 1, self.unk_id, dtype=np.int64)
        for i, token in enumerate(self.vocab):
            if len(token) == 1:
                self._table[ord(token)] = i

    def pieces(self, text: str) -> list[str]:
        return list(text)

    def count(self, text: str) -> Counter[str]:
        return Counter(text)

    def encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        size = len(self._table)
        ids = self._table[np.minimum(points, size - 1)]
        return np.where(points < size, ids, self.unk_id)


class WordTokenizer(Tokenizer):
    kind = "word"

    def __init__(self, vocab: Sequence[str], lowercase: bool = False, line_eos: bool = False,
                 word_split: str = "pattern") -> None:
        super().__init__(vocab, lowercase, line_eos)
        if self.unk_id is None:
            raise contract.ContractError(f"a word vocabulary needs {contract.UNK}")
        _check_split(word_split)
        self.word_split = word_split

    def pieces(self, text: str) -> list[str]:
        return word_pieces(text, self.line_eos, self.word_split)

    def decoder(self) -> Decoder:
        return _word_decoder(self.vocab, self.word_split)


def _check_split(word_split: str) -> None:
    if word_split not in contract.WORD_SPLITS:
        raise ValueError(f"word_split must be one of {contract.WORD_SPLITS}, got {word_split!r}")


def word_pieces(text: str, line_eos: bool = False, word_split: str = "pattern") -> list[str]:
    """The word tokens of cleaned text under `word_split` (see the module docstring)."""
    _check_split(word_split)
    pieces = _SPLIT_PATTERNS[word_split].findall(text)
    if line_eos:
        return [contract.EOS if p == contract.NEWLINE else p for p in pieces]
    return pieces


class _WordDecoder:
    """Joins word tokens with the spacing rules in the module docstring, one token at a time."""

    def __init__(self, vocab: Sequence[str]) -> None:
        self._vocab = vocab
        self._prev = contract.NEWLINE
        self._open: set[str] = set()

    def push(self, token_id: int) -> str:
        return self.push_token(self._vocab[token_id])

    def flush(self) -> str:
        return ""

    def push_token(self, token: str) -> str:
        prev, self._prev = self._prev, token
        if token in (contract.NEWLINE, contract.EOS):
            # A blank line (or, in line-per-paragraph text, any line end) closes stray quotes.
            if token == contract.EOS or prev == contract.NEWLINE:
                self._open.clear()
            return "\n"
        space = prev not in (contract.NEWLINE, contract.EOS) and prev not in _NO_SPACE_AFTER \
            and prev not in _JOINERS and not (prev in _SYMMETRIC_QUOTES and prev in self._open)
        if token in _SYMMETRIC_QUOTES:
            if token in self._open:
                self._open.discard(token)
                space = False
            else:
                self._open.add(token)
        elif token in _NO_SPACE_BEFORE or token in _JOINERS:
            space = False
        return " " + token if space else token


class _SpaceDecoder:
    """Pre-tokenized text has no spacing to re-derive: one space between tokens of a line."""

    def __init__(self, vocab: Sequence[str]) -> None:
        self._vocab = vocab
        self._line_start = True

    def push(self, token_id: int) -> str:
        return self.push_token(self._vocab[token_id])

    def flush(self) -> str:
        return ""

    def push_token(self, token: str) -> str:
        if token in (contract.NEWLINE, contract.EOS):
            self._line_start = True
            return "\n"
        text = token if self._line_start else " " + token
        self._line_start = False
        return text


def _word_decoder(vocab: Sequence[str], word_split: str) -> _WordDecoder | _SpaceDecoder:
    return _SpaceDecoder(vocab) if word_split == "whitespace" else _WordDecoder(vocab)


def respace(text: str, line_eos: bool = False, word_split: str = "pattern") -> str:
    """The whitespace normalisation under which word tokenization is lossless."""
    decoder = _word_decoder((), word_split)
    return "".join(decoder.push_token(p) for p in word_pieces(text, line_eos, word_split))


def count_tokens(kind: str, text: str, line_eos: bool = False,
                 word_split: str = "pattern") -> tuple[int, Counter[str]]:
    """(number of tokens, counts for the vocabulary) of cleaned text, without a vocabulary.

    Byte vocabularies are fixed, so bytes are not counted one by one.
    """
    if kind == "byte":
        return len(text.encode("utf-8")), Counter()
    if kind in contract.SUBWORD_TOKENIZERS:
        # Learned tokenizers do not exist yet when documents are surveyed (they are learned from
        # the training split the survey leads to): their documents are planned in characters.
        return len(text), Counter()
    if kind == "char":
        return len(text), Counter(text)
    pieces = word_pieces(text, line_eos, word_split)
    return len(pieces), Counter(pieces)


def plan_offsets(kind: str, text: str, line_eos: bool = False,
                 word_split: str = "pattern") -> np.ndarray | None:
    """Character offset of each unit `count_tokens` counted, plus len(text) at the end; None
    when the units are characters. Characters of units [a, b) = offsets[b] - offsets[a]."""
    if kind == "byte":
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        starts = (data & 0xC0) != 0x80  # a character starts at every byte but continuation bytes
        return np.concatenate([[0], np.cumsum(starts)])
    if kind == "word":
        _check_split(word_split)
        found = [m.start() for m in _SPLIT_PATTERNS[word_split].finditer(text)]
        return np.asarray(found + [len(text)], dtype=np.int64)
    return None


def byte_vocab() -> tuple[str, ...]:
    return tuple(chr(b) for b in range(256))


def build_vocab(kind: str, counts: Counter[str], min_count: int = 1, vocab_size: int | None = None,
                line_eos: bool = False) -> tuple[str, ...]:
    """The vocabulary for `kind` from corpus-wide token counts (ids are positions)."""
    if kind == "byte":
        return byte_vocab()
    if kind == "char":
        specials = [contract.UNK]
        ranked = sorted((c for c, n in counts.items() if n >= min_count and c != contract.UNK),
                        key=lambda c: (-counts[c], ord(c) if len(c) == 1 else -1, c))
    elif kind == "word":
        specials = [contract.UNK, contract.EOS if line_eos else contract.NEWLINE]
        ranked = sorted((w for w, n in counts.items() if n >= min_count and w not in specials),
                        key=lambda w: (-counts[w], w))
    else:
        raise ValueError(f"tokenizer must be one of {contract.TOKENIZERS}, got {kind!r}")
    if vocab_size is not None:
        ranked = ranked[:vocab_size]
    return tuple(specials + ranked)


_KINDS: dict[str, type[Tokenizer]] = {"byte": ByteTokenizer, "char": CharTokenizer, "word": WordTokenizer}


def make_tokenizer(kind: str, vocab: Sequence[str], lowercase: bool = False,
                   line_eos: bool = False, word_split: str = "pattern", model: bytes = b"") -> Tokenizer:
    """A tokenizer of `kind`; bpe/unigram also need their learned `model` (the file's bytes)."""
    if kind in contract.SUBWORD_TOKENIZERS:
        from preprocessing import subword  # deferred: subword imports this module

        if not model:
            raise contract.ContractError(f"a {kind} tokenizer needs its tokenizer file")
        return subword.SubwordTokenizer(kind, model, vocab, lowercase=lowercase)
    if kind not in _KINDS:
        raise ValueError(f"tokenizer must be one of {contract.TOKENIZERS}, got {kind!r}")
    if kind == "word":
        return WordTokenizer(vocab, lowercase=lowercase, line_eos=line_eos, word_split=word_split)
    if word_split != "pattern":
        raise ValueError(f"word_split {word_split!r} needs the word tokenizer, not {kind}")
    return _KINDS[kind](vocab, lowercase=lowercase, line_eos=line_eos)


def tokenizer_from_metadata(md: contract.Metadata) -> Tokenizer:
    return make_tokenizer(md.tokenizer, md.vocab, lowercase=md.lowercase, line_eos=md.line_eos,
                          word_split=md.word_split, model=md.tokenizer_model)

"""Tokenizers: vocabularies, round trips, unknowns and incremental decoding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from preprocessing import cleaning, contract, tokenizers

PROSE = ('"Well," said Alice, "I don\'t know—perhaps it\'s 1,000 miles (or more)!"\n\n'
         "_The_ end: it cost 3.50; a well-known tale... ‘Oh,’ she said. O'er the hills.\n"
         "* * * * *\n")


def _tokenizer(kind: str, text: str, **kwargs: object) -> tokenizers.Tokenizer:
    probe = tokenizers.make_tokenizer(kind, tokenizers.build_vocab(kind, Counter({contract.UNK: 1})),
                                      line_eos=bool(kwargs.get("line_eos")))
    counts = probe.count(text) if kind != "byte" else Counter()
    vocab = tokenizers.build_vocab(kind, counts, **kwargs)  # type: ignore[arg-type]
    return tokenizers.make_tokenizer(kind, vocab, line_eos=bool(kwargs.get("line_eos")))


def test_byte_vocab_and_lossless_round_trip() -> None:
    tok = _tokenizer("byte", "")
    assert tok.vocab == tuple(chr(b) for b in range(256)) and tok.unk_id is None
    text = "Grüße, 世界! 👋\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


def test_byte_incremental_decoder_holds_split_multibyte_characters() -> None:
    tok = _tokenizer("byte", "")
    ids = tok.encode("a€👋")  # 1 + 3 + 4 bytes
    decoder = tok.decoder()
    outputs = [decoder.push(i) for i in ids]
    assert outputs == ["a", "", "", "€", "", "", "", "👋"]
    truncated = tok.decoder()
    assert [truncated.push(i) for i in ids[:3]] == ["a", "", ""]
    assert truncated.flush() == "\ufffd"
    assert tok.decode(ids[:3]) == "a\ufffd"


def test_char_vocab_order_min_count_and_unknowns() -> None:
    text = "abracadabra\n"  # a:5 b:2 r:2 c:1 d:1 \n:1
    tok = _tokenizer("char", text, min_count=2)
    assert tok.vocab == (contract.UNK, "a", "b", "r")
    assert tok.unk_id == 0
    assert tok.encode("bad!") == [2, 1, 0, 0]
    full = _tokenizer("char", text)
    assert full.vocab == (contract.UNK, "a", "b", "r", "\n", "c", "d")  # ties by code point
    assert full.decode(full.encode(text)) == text


def test_char_encode_normalises_like_the_corpus() -> None:
    vocab = tokenizers.build_vocab("char", Counter("café\n"))
    tok = tokenizers.make_tokenizer("char", vocab, lowercase=True)
    assert tok.encode("CAFE\u0301\r\n") == tok.encode_array("café\n").tolist()
    assert tok.unk_id not in tok.encode("CAFE\u0301\r\n")


def test_word_pieces_rule() -> None:
    assert tokenizers.word_pieces("Don't stop—it's 1,000 _times_ <unk>!\n") == [
        "Don't", "stop", "—", "it's", "1,000", "_", "times", "_", "<unk>", "!", "\n"]


def test_word_round_trip_is_exact_for_ordinary_prose() -> None:
    tok = _tokenizer("word", PROSE)
    ids = tok.encode(PROSE)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == PROSE
    assert tokenizers.respace(PROSE) == PROSE


def test_word_round_trip_keeps_tokens_and_respaces_whitespace() -> None:
    text = "Hello ,   world  !\n  Tabs\tand   spaces .\n"
    tok = _tokenizer("word", text)
    decoded = tok.decode(tok.encode(text))
    assert decoded == tokenizers.respace(text) == "Hello, world!\nTabs and spaces.\n"
    assert tok.pieces(decoded) == tok.pieces(text)
    assert tokenizers.respace(decoded) == decoded  # the normalisation is idempotent


def test_word_vocab_size_newline_and_unknowns() -> None:
    text = "the cat saw the dog\nthe end\n"
    tok = _tokenizer("word", text, vocab_size=2)
    assert tok.vocab == (contract.UNK, "\n", "the", "cat")  # ties by spelling
    assert tok.encode("the bird\n") == [2, 0, 1]
    assert tok.decode(tok.encode("the bird\n")) == "the <unk>\n"


def test_pretokenized_unk_and_line_eos() -> None:
    text = " the <unk> fell .\n it rose <unk> .\n"
    tok = _tokenizer("word", text, line_eos=True)
    assert tok.vocab[:2] == (contract.UNK, contract.EOS)
    assert "\n" not in tok.vocab
    ids = tok.encode(text)
    assert ids.count(tok.unk_id) == 2
    assert ids.count(tok.vocab.index(contract.EOS)) == 2  # one <eos> per line, as awd-lstm-lm
    assert len(ids) == len(text.split()) + 2
    assert tok.decode(ids) == "the <unk> fell.\nit rose <unk>.\n"


def test_word_incremental_decoder_matches_decode() -> None:
    tok = _tokenizer("word", PROSE)
    ids = tok.encode(PROSE)
    decoder = tok.decoder()
    assert "".join(decoder.push(i) for i in ids) == tok.decode(ids)


def test_tokenizer_from_metadata() -> None:
    vocab = tokenizers.build_vocab("word", Counter(["a", "b", "a"]), line_eos=True)
    md = contract.Metadata(tokenizer="word", vocab=vocab, lowercase=True, line_eos=True,
                           splits={s: contract.SplitStats(0, 0, 0) for s in contract.SPLITS})
    tok = tokenizers.tokenizer_from_metadata(md)
    assert (tok.kind, tok.vocab, tok.unk_id, tok.lowercase, tok.line_eos) == ("word", vocab, 0, True, True)
    assert tok.encode("A b\n") == [vocab.index("a"), vocab.index("b"), vocab.index(contract.EOS)]


def test_bad_vocabularies_are_contract_errors() -> None:
    with pytest.raises(contract.ContractError):
        tokenizers.make_tokenizer("char", ("a", "b"))
    with pytest.raises(contract.ContractError):
        tokenizers.make_tokenizer("byte", ("a",))


# ---------------------------------------------------------------------------------------------
# Pre-tokenized corpora: the whitespace split, as awd-lstm-lm's data.py reads PTB and WikiText

PTB_LINE = " mr. <unk> 's u.s. unit is n't @-@ based on $ N a share \n"
# A WikiText-like file: blank lines (" \n"), a heading, tabs, non-ASCII whitespace (no-break,
# ideographic space), and a last line without its newline.
PRETOKENIZED = (" \n = Valkyria Chronicles III = \n \n senjō no valkyria 3 : <unk> chronicles "
                "@-@ 2011 @,@ 000 \n\n mr.\tsmith 's\u00a0u.s. plan\u3000. \n\n \n last line , no newline")


def _whitespace_tokenizer(text: str, line_eos: bool = True) -> tokenizers.Tokenizer:
    _, counts = tokenizers.count_tokens("word", text, line_eos, "whitespace")
    vocab = tokenizers.build_vocab("word", counts, line_eos=line_eos)
    return tokenizers.make_tokenizer("word", vocab, line_eos=line_eos, word_split="whitespace")


def test_whitespace_split_keeps_pretokenized_tokens_whole() -> None:
    assert tokenizers.word_pieces(PTB_LINE, line_eos=True, word_split="whitespace") == [
        "mr.", "<unk>", "'s", "u.s.", "unit", "is", "n't", "@-@", "based", "on", "$", "N", "a", "share",
        contract.EOS]
    # What the pattern split (for raw books) makes of the same line: the bug this mode fixes.
    assert tokenizers.word_pieces("mr. 's u.s. @-@") == [
        "mr", ".", "'", "s", "u", ".", "s", ".", "@", "-", "@"]
    tok = _whitespace_tokenizer(PTB_LINE)
    assert tok.encode(PTB_LINE).count(tok.unk_id) == 1  # the corpus's own <unk> is the unknown token
    assert {"'s", "u.s.", "@-@", "n't"} <= set(tok.vocab)


def test_whitespace_split_counts_tokens_like_awd_lstm_lm(tmp_path: Path) -> None:
    path = tmp_path / "wiki.valid.tokens"
    path.write_text(PRETOKENIZED, encoding="utf-8")
    with open(path, encoding="utf-8") as f:  # awd-lstm-lm data.py: line.split() + ['<eos>']
        awd = [word for line in f for word in line.split() + ["<eos>"]]
    cleaned = cleaning.clean_bytes(path.read_bytes(), keep_lines=True).text
    assert cleaned is not None
    tokens, counts = tokenizers.count_tokens("word", cleaned, line_eos=True, word_split="whitespace")
    assert tokens == len(awd) == 36
    assert counts == Counter(awd)
    tok = _whitespace_tokenizer(cleaned)
    assert [tok.vocab[i] for i in tok.encode_array(cleaned)] == awd


def test_whitespace_split_round_trip_joins_on_single_spaces() -> None:
    tok = _whitespace_tokenizer(PRETOKENIZED, line_eos=False)
    assert "\n" in tok.vocab and contract.EOS not in tok.vocab
    ids = tok.encode(PRETOKENIZED)
    decoded = tok.decode(ids)
    assert decoded == tokenizers.respace(PRETOKENIZED, word_split="whitespace") == (
        "\n= Valkyria Chronicles III =\n\nsenjō no valkyria 3 : <unk> chronicles @-@ 2011 @,@ 000\n\n"
        "mr. smith 's u.s. plan .\n\n\nlast line , no newline")
    assert tok.pieces(decoded) == tok.pieces(PRETOKENIZED) and tok.encode(decoded) == ids
    decoder = tok.decoder()
    assert "".join(decoder.push(i) for i in ids) == decoded
    eos = _whitespace_tokenizer(PTB_LINE * 2)
    assert eos.decode(eos.encode(PTB_LINE * 2)) == (PTB_LINE.strip() + "\n") * 2


def test_word_split_in_metadata_old_metadata_reads_as_pattern() -> None:
    vocab = tokenizers.build_vocab("word", Counter(["u.s.", "'s"]), line_eos=True)
    md = contract.Metadata(tokenizer="word", vocab=vocab, line_eos=True, word_split="whitespace",
                           splits={s: contract.SplitStats(0, 0, 0) for s in contract.SPLITS})
    body = json.loads(contract.metadata_to_json(md))
    assert body["word_split"] == "whitespace"
    assert contract.metadata_from_json(json.dumps(body)) == md
    tok = tokenizers.tokenizer_from_metadata(md)
    assert tok.encode("u.s. 's\n") == [vocab.index("u.s."), vocab.index("'s"), vocab.index(contract.EOS)]

    del body["word_split"]  # metadata written before the field existed
    old = contract.metadata_from_json(json.dumps(body))
    assert old.word_split == "pattern"
    assert tokenizers.tokenizer_from_metadata(old).pieces("u.s.\n") == ["u", ".", "s", ".", contract.EOS]

    with pytest.raises(contract.ContractError, match="word_split 'spaces'"):
        contract.metadata_from_json(json.dumps({**body, "word_split": "spaces"}), "x.json")
    with pytest.raises(contract.ContractError, match="needs the word tokenizer"):
        contract.metadata_from_json(json.dumps({**body, "tokenizer": "char", "word_split": "whitespace"}))
    with pytest.raises(ValueError, match="word_split"):
        tokenizers.make_tokenizer("char", (contract.UNK, "a"), word_split="whitespace")


def test_whitespace_split_in_tensorflow_matches_the_tokenizer() -> None:
    """The exported SavedModel cuts word primes with RE2: the same pieces as Python's split()."""
    tf = pytest.importorskip("tensorflow")
    from trainer import export

    text = PRETOKENIZED + "\x0b\x1c\u2028x\u2003y\x85z\n"  # every kind of whitespace str.split() knows
    pieces = export.word_pieces(tf.constant(text), export.WHITESPACE_PATTERN_RE2).numpy()
    assert [p.decode("utf-8") for p in pieces] == tokenizers.word_pieces(text, word_split="whitespace")

    # Generated ids are spaced as the Python decoder spaces them, after the prime's last token.
    tok = _whitespace_tokenizer(PTB_LINE)
    module = SimpleNamespace(kind="word", word_split="whitespace", token_text=tf.constant(
        ["\n" if t == contract.EOS else t for t in tok.vocab]))
    prime, generated = tok.encode(" mr. <unk> 's"), tok.encode("u.s. @-@ unit\n$ a share .\n")
    texts = export.GenerationModule.detokenize(module, tf.constant([generated]), tf.constant(prime[-1]))
    assert texts.numpy()[0].decode("utf-8") == tok.decode(prime + generated)[len(tok.decode(prime)):] == (
        " u.s. @-@ unit\n$ a share <unk>\n")

"""Tokenizers: vocabularies, round trips, unknowns and incremental decoding."""

from __future__ import annotations

from collections import Counter

import pytest

from preprocessing import contract, tokenizers

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

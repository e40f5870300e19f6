"""Raw book bytes → clean text: decoding, Project Gutenberg boilerplate, newlines, NFC, case."""

from __future__ import annotations

import codecs

import pytest

from preprocessing import cleaning

BODY = "CHAPTER I.\n\nIt was a bright cold day in April.\n“Quite so,” said he.\n"

NEW_STYLE = (
    "The Project Gutenberg eBook of Test Book\n\nThis eBook is for the use of anyone anywhere.\n\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK TEST BOOK ***\n\n\n" + BODY + "\n\n\n"
    "            *** END OF THE PROJECT GUTENBERG EBOOK TEST BOOK ***\n\n"
    "Updated editions will replace the previous one—the old editions will be renamed.\n"
    "START: FULL LICENSE\n")

OLD_STYLE = (
    "The Project Gutenberg EBook of Test Book, by Nobody\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK TEST BOOK ***\n\n\n\n" + BODY + "\n\n\n\n"
    "End of the Project Gutenberg EBook of Test Book, by\nNobody\n\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK TEST BOOK ***\n\n***** This file should be named 1.txt\n")


@pytest.mark.parametrize("raw", [NEW_STYLE, OLD_STYLE], ids=["THE", "THIS"])
def test_both_gutenberg_header_forms_are_stripped(raw: str) -> None:
    assert cleaning.clean_text(raw) == BODY


def test_text_without_markers_is_kept_whole() -> None:
    text = "\n\n  Verse, indented.\nNext line.  \n\n"
    assert cleaning.clean_text(text) == "  Verse, indented.\nNext line.\n"


def test_utf8_with_and_without_bom() -> None:
    raw = NEW_STYLE.encode("utf-8")
    for data in (raw, codecs.BOM_UTF8 + raw):
        cleaned = cleaning.clean_bytes(data)
        assert (cleaned.text, cleaned.encoding, cleaned.fallback) == (BODY, "utf-8", False)


def test_cp1252_curly_quotes_and_crlf() -> None:
    data = NEW_STYLE.replace("\n", "\r\n").encode("cp1252")
    assert b"\x93Quite so,\x94" in data  # the bytes a cp1252 file really holds
    cleaned = cleaning.clean_bytes(data)
    assert cleaned.text == BODY
    assert "\r" not in cleaned.text
    assert (cleaned.encoding, cleaned.fallback) == ("cp1252", True)


def test_latin1_when_cp1252_cannot_decode() -> None:
    data = ("Café déjà vu.\n" * 20).encode("latin-1") + b"\x81\n"  # 0x81 is undefined in cp1252
    cleaned = cleaning.clean_bytes(data)
    assert cleaned.encoding == "latin-1"
    assert cleaned.text is not None and cleaned.text.startswith("Café déjà vu.\n")


def test_lone_cr_and_nfc_and_lowercase() -> None:
    decomposed = "Cafe\u0301\rNaI\u0308ve\r\n"
    assert cleaning.clean_text(decomposed) == "Caf\u00e9\nNa\u00cfve\n"
    assert cleaning.clean_text(decomposed, lowercase=True) == "caf\u00e9\nna\u00efve\n"


def test_utf16_with_bom() -> None:
    assert cleaning.clean_bytes(BODY.encode("utf-16")).text == BODY


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"  \r\n\n", "empty"),
    (bytes(range(256)) * 4, "binary"),
    (b"\x89PNG\r\n\x1a\n" + bytes([7, 200, 3, 150, 17, 2]) * 200, "binary"),
    (b"*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n",
     "empty after"),
])
def test_unusable_files_get_a_reason(data: bytes, reason: str) -> None:
    cleaned = cleaning.clean_bytes(data)
    assert cleaned.text is None
    assert cleaned.skip_reason is not None and cleaned.skip_reason.startswith(reason)


def test_pretokenized_text_keeps_every_line() -> None:
    """keep_lines (the whitespace split): blank lines are <eos> tokens there, so none is trimmed."""
    raw = (" \r\n = Cafe\u0301 = \r\n \r\n *** START OF THE PROJECT GUTENBERG EBOOK X *** \r\n\r\n"
           " last line ").encode()
    expected = " \n = Café = \n \n *** START OF THE PROJECT GUTENBERG EBOOK X *** \n\n last line \n"
    cleaned = cleaning.clean_bytes(raw, keep_lines=True)
    assert (cleaned.text, cleaned.encoding) == (expected, "utf-8")
    assert cleaning.clean_bytes(raw, lowercase=True, keep_lines=True).text == expected.lower()
    assert cleaning.clean_bytes(raw).text == " last line\n"  # what raw-book cleaning makes of it

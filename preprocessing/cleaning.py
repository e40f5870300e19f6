"""Raw book bytes → clean text. Pure functions, no Beam: the job and the benchmark share them.

Cleaning, in order: decode (UTF-8 with or without BOM, UTF-16 with BOM; else cp1252, else
Latin-1, reported as a fallback), line endings to LF, strip the Project Gutenberg header and
licence footer, Unicode NFC, optional lower-casing, then trim blank lines at both ends and
end with exactly one newline. Files that cannot be text get a skip reason instead.

Pre-tokenized corpora (`keep_lines`, for the word tokenizer's whitespace split) skip the header
stripping and the trimming: every line is data there, blank ones included, because awd-lstm-lm
gives each line of such a file an `<eos>` and token counts must match its. Only a missing final
newline is added, as awd-lstm-lm also ends an unterminated last line with `<eos>`.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
import unicodedata

# A text file with more control characters than this is binary that happened to decode.
MAX_CONTROL_FRACTION = 0.01
# C0 and C1 control characters other than tab, newlines and form feeds.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)

# Both the current "THE" and the older "THIS" forms; some books add spaces or drop the "EBOOK".
_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG(?: E-?BOOK)?[^\n]*\n?",
    re.IGNORECASE | re.MULTILINE)
_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG(?: E-?BOOK)?",
    re.IGNORECASE | re.MULTILINE)
# Older books repeat "End of the Project Gutenberg EBook of X, by Y" just above the END marker.
_END_LINE = re.compile(r"^[ \t]*End of (?:the )?Project Gutenberg'?s?[ \t]", re.IGNORECASE | re.MULTILINE)
_END_LINE_WINDOW = 1000


class Unusable(ValueError):
    """A file that cannot be used as text; the message is the skip reason."""


@dataclasses.dataclass(frozen=True)
class Decoded:
    text: str
    encoding: str

    @property
    def fallback(self) -> bool:
        """True when the bytes were not UTF-8 and a legacy code page was guessed."""
        return self.encoding in ("cp1252", "latin-1")


@dataclasses.dataclass(frozen=True)
class Cleaned:
    """The outcome for one file: `text` is set, or `skip_reason` says why not."""

    text: str | None
    encoding: str | None = None
    skip_reason: str | None = None

    @property
    def fallback(self) -> bool:
        return self.encoding in ("cp1252", "latin-1")


def decode(data: bytes) -> Decoded:
    """Bytes → text, trying UTF-8 first; raises Unusable for empty or binary data."""
    if not data.strip():
        raise Unusable("empty file")
    if data.startswith(_UTF16_BOMS):
        try:
            return _checked(Decoded(data.decode("utf-16"), "utf-16"))
        except UnicodeDecodeError:
            raise Unusable("not decodable: UTF-16 byte-order mark but invalid UTF-16") from None
    if b"\x00" in data:
        raise Unusable("binary: contains NUL bytes")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return _checked(Decoded(data.decode(encoding), encoding.replace("-sig", "")))
        except UnicodeDecodeError:
            continue
    # Latin-1 maps every byte, so this always decodes; the control-character check catches junk.
    return _checked(Decoded(data.decode("latin-1"), "latin-1"))


def _checked(decoded: Decoded) -> Decoded:
    text = decoded.text
    sample = text[:100_000]
    controls = len(_CONTROL.findall(sample))
    if sample and controls / len(sample) > MAX_CONTROL_FRACTION:
        raise Unusable(f"binary: {controls / len(sample):.0%} control characters as {decoded.encoding}")
    return decoded


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR (old Mac files) → LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """The book between the Project Gutenberg START and END markers; text without markers as is.

    Expects LF line endings. The licence footer, the header and the "End of the Project
    Gutenberg EBook of …" line that older books put above the END marker are removed.
    """
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
        tail_start = max(0, len(text) - _END_LINE_WINDOW)
        lines = list(_END_LINE.finditer(text, tail_start))
        if lines:
            text = text[:lines[-1].start()]
    return text


def normalize(text: str, lowercase: bool = False) -> str:
    """Newlines, NFC and case: what both the corpus and a user's prime go through."""
    text = unicodedata.normalize("NFC", normalize_newlines(text))
    return text.lower() if lowercase else text


def trim(text: str) -> str:
    """Drop blank lines at both ends and trailing spaces; end with exactly one newline.

    Leading spaces of the first line are kept: verse and tables are indented on purpose.
    """
    lines = text.split("\n")
    first = 0
    while first < len(lines) and not lines[first].strip():
        first += 1
    body = "\n".join(lines[first:]).rstrip()
    return body + "\n" if body else ""


def clean_text(text: str, lowercase: bool = False) -> str:
    """Decoded text → cleaned text (may be empty)."""
    return trim(normalize(strip_gutenberg(normalize_newlines(text)), lowercase))


def clean_lines(text: str, lowercase: bool = False) -> str:
    """Decoded pre-tokenized text → the same lines, normalised, each ending in a newline."""
    text = normalize(text, lowercase)
    return text if not text or text.endswith("\n") else text + "\n"


def clean_bytes(data: bytes, lowercase: bool = False, keep_lines: bool = False) -> Cleaned:
    """A whole file's bytes → Cleaned text or a skip reason. Never raises for bad data."""
    try:
        decoded = decode(data)
    except Unusable as err:
        return Cleaned(None, skip_reason=str(err))
    text = (clean_lines if keep_lines else clean_text)(decoded.text, lowercase)
    if not text:
        return Cleaned(None, decoded.encoding, "empty after removing the Project Gutenberg header/footer")
    return Cleaned(text, decoded.encoding)

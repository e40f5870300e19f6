"""bench/budget.py's pure parts: the whole-book split, flag parsing, the CPU's name, which stored
references are reused, and the table's verdicts. Fast: no training, no torch, no /work/shared."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import budget  # noqa: E402


def test_split_books_keeps_the_last_tenth_of_books_whole_by_name() -> None:
    books = [Path(f"/shelf/pg{n}.txt") for n in range(300, 363)]  # 63 books, given unsorted below
    train, valid = budget.split_books(list(reversed(books)))
    assert len(train) + len(valid) == 63 and len(valid) == 6
    assert valid == sorted(books, key=lambda p: p.name)[-6:]
    assert not set(train) & set(valid)
    assert budget.split_books([Path("b.txt"), Path("a.txt")]) == ([Path("a.txt")], [Path("b.txt")])
    with pytest.raises(ValueError, match="two books"):
        budget.split_books([Path("a.txt")])


def test_parse_minutes() -> None:
    assert budget.parse_minutes("1,10,30") == (1.0, 10.0, 30.0)
    assert budget.parse_minutes("0.5") == (0.5,)
    for bad in ("", "abc", "0", "-5,1", "nan", "1,,2", "inf"):
        with pytest.raises(ValueError, match="--minutes"):
            budget.parse_minutes(bad)


def test_parse_corpora_and_missing_corpus(tmp_path: Path) -> None:
    corpora = budget.default_corpora(tmp_path / "shelf", tmp_path / "input.txt")
    chosen = budget.parse_corpora("tinyshakespeare, shelf", corpora)
    assert [c.name for c in chosen] == ["tinyshakespeare", "shelf"]
    with pytest.raises(ValueError, match="--corpus"):
        budget.parse_corpora("books", corpora)
    with pytest.raises(ValueError, match="--shelf="):
        budget.source_description(corpora["shelf"])
    with pytest.raises(ValueError, match="--tinyshakespeare="):
        budget.source_description(corpora["tinyshakespeare"])


def test_cpu_name_has_model_family_and_model() -> None:
    cpuinfo = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
               "model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n\nprocessor\t: 1\n"
               "model name\t: other\n")
    assert budget.cpu_name(cpuinfo) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (family 6, model 143)"


def _reference(loss: float, train: int = 900, valid: int = 100) -> dict:
    return {"shape": "?", "iters": 10, "valid_loss": loss, "train_seconds": 60.0, "train_tokens": train,
            "valid_tokens": valid, "date": "today"}


def test_plan_reuses_stored_references_of_the_same_data_only(tmp_path: Path) -> None:
    corpora = budget.default_corpora(tmp_path, tmp_path / "input.txt")
    shelf = corpora["shelf"]
    prepared = {"shelf": {"tokens": {"train": 900, "valid": 100}}}
    stored = {"cpu": {"shelf": {"10": {"4x4x128": _reference(1.5), "6x6x192": _reference(1.4, train=1)}}}}
    runs = budget.plan([shelf], (1.0, 10.0), None, "cpu", stored, prepared, rerun_reference=False)
    # 1 minute: the baby only; 10 minutes: the baby is stored, 6x6x192 was on other data.
    assert [(r.kind, r.minutes, r.shape) for r in runs] == [
        ("reference", 1.0, "4x4x128"), ("verne", 1.0, ""),
        ("reference", 10.0, "6x6x192"), ("verne", 10.0, "")]
    again = budget.plan([shelf], (10.0,), "reference", "cpu", stored, prepared, rerun_reference=True)
    assert [r.shape for r in again] == ["4x4x128", "6x6x192"]
    elsewhere = budget.plan([shelf], (10.0,), "reference", "other cpu", stored, prepared, False)
    assert [r.shape for r in elsewhere] == ["4x4x128", "6x6x192"]
    assert [r.kind for r in budget.plan([shelf], (10.0,), "verne", "cpu", {}, prepared, False)] == ["verne"]
    one = budget.plan([shelf], (1.0, 10.0), "reference", "cpu", stored, prepared, True, ("6x6x192",))
    assert [(r.minutes, r.shape) for r in one] == [(10.0, "6x6x192")]


def test_store_merges_and_the_table_judges_against_the_better_shape(tmp_path: Path) -> None:
    corpora = budget.default_corpora(tmp_path, tmp_path / "input.txt")
    references, verne = tmp_path / "ref.json", tmp_path / "verne.json"
    budget.store(references, "cpu", "shelf", 10, _reference(1.50), "4x4x128")
    budget.store(references, "cpu", "shelf", 10, _reference(1.45), "6x6x192")
    budget.store(references, "cpu", "tinyshakespeare", 1, _reference(1.90), "4x4x128")
    ours = {"model": "lstm 2x512", "steps": 100, "wall_seconds": 600.0, "within_budget": True,
            "commit": "abc"}
    budget.store(verne, "cpu", "shelf", 10, {**ours, "valid_loss": 1.34, "chosen": {"reason": "because"}})
    budget.store(verne, "cpu", "tinyshakespeare", 1, {**ours, "valid_loss": 1.70, "within_budget": False})
    rows = budget.rows_for("cpu", budget.read_json(references), budget.read_json(verne), corpora)
    row = next(r for r in rows if r["corpus"] == "shelf" and r["minutes"] == 10)
    assert row["reference"]["valid_loss"] == 1.45 and row["complete"]
    text = budget.table("cpu", rows)
    lines = {line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in text.splitlines()
             if line.startswith("| shelf") or line.startswith("| tinyshakespeare")}
    assert "-0.1100" in lines["| shelf | 10m"] and "**yes**" in lines["| shelf | 10m"]
    assert "off budget" in lines["| shelf | 10m"]  # its training took 60 s of 600
    assert "off budget" not in lines["| tinyshakespeare | 1m"]
    # 0.20 ahead, but over its budget: not met.
    over = lines["| tinyshakespeare | 1m"]
    assert "over budget" in over and over.endswith("| no |")
    assert "not run" in lines["| shelf | 30m"]
    assert "CPU: **cpu**" in text
    assert "- shelf, 10m: because" in text

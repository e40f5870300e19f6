"""`python -m trainer.babble` and `generate_from_job`: job-dir resolution, seeds, primes, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from generation_job import MODEL, python_env, trained_job

from trainer.babble import generate_from_job
from trainer.errors import UsageError


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "generation"


@pytest.fixture(scope="session")
def char_job(root: Path) -> str:
    return trained_job(root, "char")


def babble(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.babble", *args], capture_output=True, text=True,
                          env=python_env(), timeout=300)


def test_cli_streams_the_same_text_for_the_same_seed_from_either_job_dir(char_job: str, root: Path) -> None:
    common = ["--prime", "First Ciéizen", "--length", "60", "--seed", "3", "--temperature", "0.9", "--no_unk"]
    concrete = babble("--job-dir", char_job, *common)
    assert concrete.returncode == 0, concrete.stderr
    assert concrete.stdout.startswith("First Ciéizen") and len(concrete.stdout) == len("First Ciéizen") + 61
    assert "not in the vocabulary" in concrete.stderr and "'é'" in concrete.stderr
    shape = [f"--{name}={value}" for name, value in MODEL.items()]
    resolved = babble("--job-dir", str(root / "job" / "%JOB%"), "--data_dir", str(root / "data-char"),
                      "--data_prefix", "tiny", *shape, *common)
    assert resolved.returncode == 0, resolved.stderr
    assert resolved.stdout == concrete.stdout
    library = generate_from_job(char_job, "First Ciéizen", 60, temperature=0.9, seed=3, no_unk=True)
    assert library == [concrete.stdout[:-1]]


def test_cli_errors_are_one_line(root: Path) -> None:
    missing = babble("--job-dir", str(root / "no-such-job"), "--length", "5")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("error: --job-dir=")
    assert "Traceback" not in missing.stderr


def test_generate_from_job_batches_samples(char_job: str) -> None:
    samples = generate_from_job(char_job, "All", 30, num_samples=3, seed=8, no_unk=True)
    assert len(samples) == 3 and all(s.startswith("All") and len(s) == 33 for s in samples)
    assert len(set(samples)) > 1
    assert generate_from_job(char_job, "All", 30, num_samples=3, seed=8, no_unk=True) == samples
    with pytest.raises(UsageError, match="--length"):
        generate_from_job(char_job, "All", 0)
    (best,) = generate_from_job(char_job, "All", 5, best=True)  # training evaluated, so best/ exists
    assert best.startswith("All")


def test_word_model_spacing_and_no_unk(root: Path) -> None:
    job = trained_job(root, "word")
    samples = generate_from_job(job, "You are zebra", 60, num_samples=4, temperature=1.5, seed=1, no_unk=True)
    for text in samples:
        assert text.startswith("You are zebra") and text[len("You are zebra")] in " \n"
        assert "<unk>" not in text[len("You are zebra"):]
        assert " ," not in text and " ." not in text and " \n" not in text
    # Without --no_unk this hot, nearly untrained model does write <unk>: the check above can fail.
    free = generate_from_job(job, "You are zebra", 60, num_samples=4, temperature=1.5, seed=1)
    assert any("<unk>" in text[len("You are zebra"):] for text in free)

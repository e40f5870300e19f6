"""The native kernels build for every x86-64 CPU a user is likely to have, and say why when not.

One machine has one CPU, so the op is also compiled (compile only, no link, no run) with the
flags `-march=native` would get on other CPUs: a header that breaks on a CPU nobody here has
(TensorFlow 2.21's Eigen with AVX512-FP16 did) then fails CI rather than a user's first run.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trainer.kernels import native

# Intel: AVX2 only, AVX-512 (Ice Lake: Google Cloud's N2/C2-class), AVX512-FP16 + AMX (Sapphire
# Rapids: C3/N4), Granite Rapids (C4); AMD: the newest Zen generation the compiler knows.
INTEL = ("x86-64-v3", "x86-64-v4", "icelake-server", "sapphirerapids", "graniterapids")
ZEN_NEWEST_FIRST = ("znver5", "znver4", "znver3", "znver2")


def _compiler_knows(march: str) -> bool:
    command = [native._compiler(), f"-march={march}", "-x", "c++", "-E", "-o", os.devnull, os.devnull]
    probe = subprocess.run(command, capture_output=True, check=False)
    return probe.returncode == 0


def _targets() -> list[str]:
    if shutil.which(native._compiler()) is None or not native._is_x86():
        return []
    known = [march for march in INTEL if _compiler_knows(march)]
    return known + [march for march in ZEN_NEWEST_FIRST if _compiler_knows(march)][:1]


TARGETS = _targets()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Compiles the op once per target, two at a time (the 2-core machine's cores)."""
    scratch = tmp_path_factory.mktemp("march")

    def compile_for(march: str) -> subprocess.CompletedProcess:
        output = str(scratch / f"{march}.o")
        command = native.compile_command(output, native.target_flags(march), shared=False)
        return subprocess.run(command, capture_output=True, text=True, check=False)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(TARGETS, pool.map(compile_for, TARGETS), strict=True))


@pytest.mark.skipif(not TARGETS, reason="no g++ for x86-64 here: the cross-CPU compile check did not run")
def test_the_targets_cover_avx512_fp16_and_a_zen() -> None:
    assert "sapphirerapids" in TARGETS and any(t.startswith("znver") for t in TARGETS), TARGETS


@pytest.mark.parametrize("march", TARGETS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no g++ for x86-64 here: the cross-CPU compile check did not run"))])
def test_native_op_compiles_for(compiled: dict, march: str) -> None:
    result = compiled[march]
    assert result.returncode == 0, f"-march={march}: {native.first_error(result.stderr)}"


def test_march_native_turns_off_what_tensorflows_eigen_breaks_on() -> None:
    flags = native.target_flags("native")
    assert flags[0] == "-march=native"
    if native._is_x86() and native.compiler_accepts(native._compiler(), "-mno-avx512fp16"):
        assert "-mno-avx512fp16" in flags


def test_build_targets_fall_back_to_generic_levels() -> None:
    avx512 = frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma"})
    names = [name for name, _ in native.build_targets(avx512)]
    assert names[0].startswith("this CPU") and names[-1] == "the compiler's default target"
    if native._is_x86():
        assert names[1] == "x86-64-v4"
        assert [name for name, _ in native.build_targets(frozenset({"sse2"}))][1:] == [
            "the compiler's default target"]


def test_first_error_names_the_file_line_and_text() -> None:
    import tensorflow as tf

    include = tf.sysconfig.get_include()
    stderr = (f"In file included from {include}/Eigen/Core:200,\n"
              f"{include}/Eigen/src/Core/arch/AVX512/PacketMathFP16.h:740:49: error: expected "
              "initializer before '<' token\n  740 | EIGEN_STRONG_INLINE half predux_half_dowto4<Packet32h>\n"
              "      |                                                 ^\n"
              f"{include}/Eigen/src/Core/arch/AVX512/PacketMathFP16.h:748:48: error: again\n")
    assert native.first_error(stderr) == (
        "Eigen/src/Core/arch/AVX512/PacketMathFP16.h:740: error: expected initializer before '<' token")
    linker = "/usr/bin/ld: cannot find -ltensorflow_framework\ncollect2: error: ld returned 1 exit status\n"
    assert native.first_error(linker) == "/usr/bin/ld: cannot find -ltensorflow_framework"


# A stand-in compiler: fails like GCC 12 on Eigen for -march=native (or always, with FAIL_ALWAYS
# set; dies of SIGINT with DIE_BY_SIGINT, of SIGKILL with DIE_BY_SIGKILL; reports its cc1plus
# OOM-killed as GCC's driver does with CC1PLUS_KILLED; rejects -mno-avx512fp16 as GCC 11 does, and
# so builds for -march=native, with GCC11), otherwise writes the output file; it counts its compile
# calls (not its option probes, `-E`) in CALLS.
FAKE_COMPILER = """#!{python}
import os, signal, sys
args = sys.argv[1:]
if "--version" in args:
    print("fake-g++ 1.0")
    sys.exit(0)
gcc11 = os.environ.get("GCC11")
if gcc11 and "-mno-avx512fp16" in args:
    sys.stderr.write("g++: error: unrecognized command-line option '-mno-avx512fp16'; "
                     "did you mean '-mno-avx512f'?\\n")
    sys.exit(1)
if "-E" in args:
    sys.exit(0)
with open(os.environ["CALLS"], "a") as calls:
    calls.write("x")
if os.environ.get("DIE_BY_SIGINT"):  # as a compiler does when Ctrl-C reaches its process group
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
if os.environ.get("DIE_BY_SIGKILL"):  # the OOM killer
    os.kill(os.getpid(), signal.SIGKILL)
if os.environ.get("CC1PLUS_KILLED"):
    sys.stderr.write("g++: fatal error: Killed signal terminated program cc1plus\\n"
                     "compilation terminated.\\n")
    sys.exit(1)
if os.environ.get("FAIL_ALWAYS") or ("-march=native" in args and not gcc11):
    sys.stderr.write("{include}/Eigen/src/Core/arch/AVX512/PacketMathFP16.h:740:49: error: "
                     "expected initializer before '<' token\\n      |    ^\\n")
    sys.exit(1)
open(args[args.index("-o") + 1], "w").write("not really a library")
"""


@pytest.fixture
def fake_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import tensorflow as tf

    compiler = tmp_path / "fake-g++"
    compiler.write_text(FAKE_COMPILER.format(python=sys.executable, include=tf.sysconfig.get_include()))
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    monkeypatch.setenv("VERNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    native.load.cache_clear()
    yield tmp_path
    native.load.cache_clear()


def test_a_failed_native_build_falls_back_to_a_generic_target(fake_compiler: Path) -> None:
    path = native.library_path()
    note = native.build(path)
    assert path.read_text() == "not really a library"
    assert "PacketMathFP16.h:740: error: expected initializer before '<' token" in note
    assert note.startswith("built for x86-64-v") or note.startswith("built for the compiler's default")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left behind


def test_a_build_that_fails_every_way_says_why_in_one_line_once(
        fake_compiler: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("FAIL_ALWAYS", "1")
    assert native.load() is None
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "PacketMathFP16.h:740: error: expected initializer before '<' token" in message
    assert f"{native.ENV_SWITCH}=0" in message and "g++" in message
    calls = (fake_compiler / "calls").read_text()
    assert len(calls) == len(native.build_targets(native.cpu_flags()))
    native.load.cache_clear()
    assert native.load() is None  # remembered: no second build
    assert (fake_compiler / "calls").read_text() == calls
    assert "PacketMathFP16.h:740" in capsys.readouterr().err
    assert not native.library_path().exists()


def test_a_compiler_killed_by_ctrl_c_interrupts_instead_of_trying_another_target(
        fake_compiler: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIE_BY_SIGINT", "1")
    with pytest.raises(KeyboardInterrupt):
        native.build(native.library_path())
    assert (fake_compiler / "calls").read_text() == "x"
    assert not native.library_path().parent.exists() or not any(native.library_path().parent.iterdir())


@pytest.mark.parametrize("how", ["DIE_BY_SIGKILL", "CC1PLUS_KILLED"])
def test_a_compiler_killed_by_the_oom_killer_is_not_remembered_as_a_failed_build(
        fake_compiler: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        how: str) -> None:
    monkeypatch.setenv(how, "1")
    assert native.load() is None
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the compiler was killed by SIGKILL (out of memory?)" in message, message
    assert "the next run builds again" in message
    assert (fake_compiler / "calls").read_text() == "x"  # no other target tried: it would die too
    assert not native.library_path().with_suffix(".failed").exists()
    assert not any(native.library_path().parent.iterdir())  # no library, no temporary
    # The next run (memory freed) builds, for this CPU's generic level as the stand-in allows.
    monkeypatch.delenv(how)
    native.load.cache_clear()
    native.build(native.library_path())
    assert native.library_path().read_text() == "not really a library"


def test_a_compiler_without_mno_avx512fp16_still_builds_for_this_cpu(
        fake_compiler: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCC11", "1")
    assert not native.compiler_accepts(native._compiler(), "-mno-avx512fp16")
    assert native.target_flags("native") == ["-march=native"]
    assert native.build(native.library_path()) is None  # None: built for this exact CPU
    assert (fake_compiler / "calls").read_text() == "x"
    monkeypatch.delenv("GCC11")  # a compiler that knows the flag (a new path: the probe is per compiler)
    newer = fake_compiler / "fake-g++-12"
    newer.write_bytes((fake_compiler / "fake-g++").read_bytes())
    newer.chmod(0o755)
    monkeypatch.setenv("CXX", str(newer))
    assert native.target_flags("native")[1:] == (["-mno-avx512fp16"] if native._is_x86() else [])


# Runs in a fresh process: the emulated library registers the same ops as the real one.
EMULATED_AMX_RUN = """
import json, sys
sys.path.insert(0, "tests")
import numpy as np
import tensorflow as tf
import test_kernels as tk
from trainer.kernels import native, reference

ops = tf.load_op_library(sys.argv[1])
native.load = lambda: ops
isa, worst_forward, worst_gradient = native.bf16_isa(), 0.0, 0.0
# Per thread (2 threads) 19 and 35 rows: two row tiles, a partial one, a second pass of 32 rows.
for cell in ("lstm", "gru"):
    for shape in [*tk.BF16_SHAPES, (37, 3, 20), (70, 2, 9)]:
        args = tk._inputs(cell, *shape)
        got, got_grads = tk._run(tk.IMPLEMENTATIONS["native"][cell], cell, args, tf.bfloat16)
        _, want_grads = tk._run(tk.REFERENCE[cell], cell, args, tf.float32)
        original, reference._recurrent_matmul = reference._recurrent_matmul, tk._bf16_inputs_matmul
        want, _ = tk._run(tk.REFERENCE[cell], cell, args, tf.float32)
        reference._recurrent_matmul = original
        worst_forward = max([worst_forward, *(float(np.abs(g - w).max()) for g, w in zip(got, want))])
        worst_gradient = max([worst_gradient, *(float(np.abs(g - w).max() / np.abs(w).max())
                                                for g, w in zip(got_grads, want_grads))])
print(json.dumps({"isa": isa, "forward": worst_forward, "gradient": worst_gradient}))
"""


@pytest.mark.skipif(not TARGETS or "avx512_bf16" not in native.cpu_flags(),
                    reason="needs g++ for x86-64 and a CPU with AVX512_BF16: the AMX code's emulated run "
                           "did NOT happen here")
def test_amx_code_through_a_scalar_emulation_matches_the_bfloat16_reference(tmp_path: Path) -> None:
    # No machine here has AMX: the AMX code path (tiles, padding, edge tiles, its self-check) runs
    # with each tile instruction replaced by its scalar definition, on odd sizes.
    library = tmp_path / "emulated_amx.so"
    build = subprocess.run(native.compile_command(str(library), [*native.target_flags("native"),
                                                                 "-DVERNE_AMX_EMULATION"]),
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, native.first_error(build.stderr)
    run = subprocess.run([sys.executable, "-c", EMULATED_AMX_RUN, str(library)], capture_output=True,
                         text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["isa"] == "amx", result  # the self-check against AVX512-BF16 passed
    assert result["forward"] <= 1e-5 and result["gradient"] <= 2e-2, result

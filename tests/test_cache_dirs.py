"""The per-machine cache directories, and XLA's persistent compile cache (trainer/cache_dirs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from trainer import cache_dirs
from trainer.hparams import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def test_xla_dir_is_keyed_by_tensorflow_cpu_and_xla_flags(tmp_path: Path) -> None:
    env = {"VERNE_CACHE_DIR": str(tmp_path)}
    base = cache_dirs.xla_dir(env, frozenset({"avx2", "avx512f"}), "tensorflow-2.21.0")
    assert base.parent == tmp_path / "xla"
    assert cache_dirs.xla_dir(env, frozenset({"avx512f", "avx2"}), "tensorflow-2.21.0") == base
    assert cache_dirs.xla_dir(env, frozenset({"avx2"}), "tensorflow-2.21.0") != base
    assert cache_dirs.xla_dir(env, frozenset({"avx2", "avx512f"}), "tensorflow-2.20.0") != base
    with_flags = {**env, "XLA_FLAGS": "--xla_cpu_use_onednn=true"}
    assert cache_dirs.xla_dir(with_flags, frozenset({"avx2", "avx512f"}), "tensorflow-2.21.0") != base
    # Two CPU generations with the same flags (AMD Zen 4 and Zen 5 virtual machines) keep apart.
    zen4 = cache_dirs.xla_dir(env, frozenset({"avx2"}), "tensorflow-2.21.0", "AuthenticAMD 25 17")
    assert zen4 == cache_dirs.xla_dir(env, frozenset({"avx2"}), "tensorflow-2.21.0", "AuthenticAMD 25 17")
    assert zen4 != cache_dirs.xla_dir(env, frozenset({"avx2"}), "tensorflow-2.21.0", "AuthenticAMD 26 2")


def test_cpu_model_reads_the_first_cpus_vendor_family_and_model(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                       "model name\t: AMD EPYC\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\n")
    assert cpu_model(str(cpuinfo)) == "AuthenticAMD 25 17"
    assert cpu_model(str(tmp_path / "absent")) == ""


def test_root_follows_verne_then_xdg(tmp_path: Path) -> None:
    assert cache_dirs.root({"VERNE_CACHE_DIR": str(tmp_path / "v"), "XDG_CACHE_HOME": "/x"}) == tmp_path / "v"
    assert cache_dirs.root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "verne"


def test_cache_flag_created_unless_given_off_or_unwritable(tmp_path: Path) -> None:
    env = {"VERNE_CACHE_DIR": str(tmp_path / "cache")}
    flag = cache_dirs.xla_cache_flag("--tf_xla_cpu_global_jit", env)
    directory = Path(flag.partition("=")[2])
    assert flag.startswith(cache_dirs.PERSISTENT_CACHE_FLAG + "=") and directory.is_dir()
    assert directory.is_relative_to(tmp_path / "cache")
    assert cache_dirs.xla_cache_flag("--tf_xla_persistent_cache_directory=/mine", env) == ""
    assert cache_dirs.xla_cache_flag("", {**env, cache_dirs.XLA_CACHE_SWITCH: "0"}) == ""
    onednn = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"
    assert cache_dirs.xla_cache_flag("", {**env, "XLA_FLAGS": onednn}) == ""
    assert cache_dirs.xla_cache_flag("", {**env, "XLA_FLAGS": "--xla_cpu_use_onednn=true"}) != ""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # TensorFlow fails the first compiled step on a directory it cannot write: no flag then.
    assert cache_dirs.xla_cache_flag("", {"VERNE_CACHE_DIR": str(blocker)}) == ""


def test_prune_deletes_the_oldest_down_to_half(tmp_path: Path) -> None:
    for age, name in enumerate(("newest", "middle", "oldest")):
        path = tmp_path / name
        path.write_bytes(b"x" * 100)
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    assert cache_dirs.prune(tmp_path, max_bytes=300) == 0  # not over: nothing deleted
    assert cache_dirs.prune(tmp_path, max_bytes=250) == 200  # down to <= 125 bytes
    assert [p.name for p in tmp_path.iterdir()] == ["newest"]


_COMPILE_A_STEP = """
import os, tensorflow as tf
import trainer
assert "--tf_xla_persistent_cache_directory" in os.environ["TF_XLA_FLAGS"], os.environ["TF_XLA_FLAGS"]
f = tf.function(lambda x: tf.reduce_sum(tf.tanh(x) * 3.0), jit_compile=True)
print(float(f(tf.ones([4, 4]))))
"""


def test_a_compiled_step_is_written_once_and_reused(tmp_path: Path) -> None:
    env = {**os.environ, "VERNE_CACHE_DIR": str(tmp_path), "TF_XLA_FLAGS": ""}
    env.pop(cache_dirs.XLA_CACHE_SWITCH, None)

    def run() -> list[Path]:
        done = subprocess.run([sys.executable, "-c", _COMPILE_A_STEP], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert abs(float(done.stdout.split()[-1]) - 16 * 3 * 0.76159) < 1e-3  # 16 x 3 tanh(1)
        return sorted((tmp_path / "xla").rglob("*.pb"))

    first = run()
    assert len(first) == 1, first  # the executable was saved
    stamp = first[0].stat().st_mtime_ns
    assert run() == first and first[0].stat().st_mtime_ns == stamp  # loaded, not compiled again



_COMPILE_A_MATMUL = """
import os, tensorflow as tf
import trainer
f = tf.function(lambda x: tf.reduce_sum(tf.matmul(x, x) + 1.0), jit_compile=True)
print(float(f(tf.ones([64, 64]))), "--tf_xla_persistent_cache_directory" in os.environ["TF_XLA_FLAGS"])
"""


def test_a_compiled_step_runs_with_xla_onednn_fusions(tmp_path: Path) -> None:
    """With oneDNN fusions asked of XLA and a persistent cache set, TensorFlow 2.21 died of a
    segmentation fault at the first compiled matmul: verne sets no cache then, and it runs."""
    env = {**os.environ, "VERNE_CACHE_DIR": str(tmp_path), "TF_XLA_FLAGS": "",
           "XLA_FLAGS": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"}
    env.pop(cache_dirs.XLA_CACHE_SWITCH, None)
    done = subprocess.run([sys.executable, "-c", _COMPILE_A_MATMUL], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == [str(64.0 * 64 * 65), "False"]

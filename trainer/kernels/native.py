"""verne's native CPU ops: built on first use, cached, loaded as one library.

- `native_recurrences.cc`: the whole-window LSTM and GRU recurrences, one op each way.
- `native_matmul.cc`: a bfloat16 matmul that XLA calls from a compiled step (`xla_bf16_matmul`;
  the transformer's dense layers under --xla=step --precision=bfloat16).
- `native_attention.cc`: the transformer's causal attention over a window on its own, one op each
  way (`causal_attention_native`; training and evaluation windows under --precision=bfloat16
  outside a compiled step, e.g. --xla=fusion).
All run their bfloat16 products on `bf16_products.h`.

Why a C++ op: on a 2-core CPU a recurrence step written as TensorFlow ops is ~20 small ops
whose dispatch, not their FLOPs, is most of the time (PyTorch's fused oneDNN LSTM pays none).
Here the whole window's recurrence is one op forward and one backward; the input projection and
the recurrent weight gradient stay single large TensorFlow matmuls around them. Under
`compute_dtype=tf.bfloat16` the op's per-step products run in bfloat16 (AVX512-BF16 or AMX, chosen
by the op at run time, `bf16_isa()`), in float32 on CPUs without them.

The library is compiled with the machine's C++ compiler against the installed TensorFlow's
headers (`tf.sysconfig`), for this CPU (`-march=native`), into a cache directory keyed by the
source, TensorFlow's version, the compiler, the compile commands and the CPU's flags and model, so a change
to any of them rebuilds it. Should the build for this exact CPU fail (a compiler or a header that
does not know it), it is built once more for the newest generic x86-64 level the CPU has, then for
the compiler's default target, and the first that builds is used; a build that fails every way is
remembered (a `.failed` file beside where the library would be) so later runs do not pay for it
again; a compiler killed by a signal (the OOM killer's SIGKILL) proves nothing, so that is not
remembered and the next run builds again. Where no compiler is found or nothing builds, `load()`
returns None and the callers keep the pure-TensorFlow kernels (`lstm.py`, `gru.py`);
`VERNE_NATIVE_KERNELS=0` asks for that explicitly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import tensorflow as tf

from trainer import cache_dirs
from trainer.hparams import cpu_flags, cpu_model
from trainer.kernels.lstm import cast, zeros_if_none

KERNELS = pathlib.Path(__file__).parent
# One library: the recurrence ops, the bfloat16 matmul XLA calls in a compiled step
# (native_matmul.cc) and the causal attention op, all on the products of bf16_products.h.
SOURCES = (KERNELS / "native_recurrences.cc", KERNELS / "native_matmul.cc", KERNELS / "native_attention.cc")
HEADERS = (KERNELS / "bf16_products.h", KERNELS / "tf_op.h")
ENV_SWITCH = "VERNE_NATIVE_KERNELS"
# `VERNE_XLA_BF16_MATMUL=0`: the transformer's matmuls in a compiled step keep XLA's dot instead
# of the library's bfloat16 product (kernels.xla_bf16_matmul_here), and --precision=auto keeps
# float32 under --xla=step.
XLA_BF16_MATMUL_SWITCH = "VERNE_XLA_BF16_MATMUL"


def cache_dir() -> pathlib.Path:
    return cache_dirs.root() / "ops"


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


# -march=native turns on every extension of this CPU, and TensorFlow 2.21's bundled Eigen does not
# compile with AVX512-FP16 on (Eigen/src/Core/arch/AVX512/PacketMathFP16.h, GCC 12), which Intel
# CPUs since Sapphire Rapids have (Google Cloud's C3, N4, C4). The op computes in float32 and uses
# no FP16 arithmetic, so that one extension is turned off and everything else -march=native finds
# stays. tests/test_native_build.py compiles the op for a range of CPUs to catch the next one.
# A compiler that does not know the flag (GCC 11, Ubuntu 22.04's default) rejects it, so it is only
# passed to compilers that accept it: one that does not know AVX512-FP16 cannot turn it on either.
_EIGEN_BREAKING_EXTENSIONS = ("-mno-avx512fp16",)
# The generic x86-64 levels (GCC 11+, clang 12+), newest first, with the /proc/cpuinfo flags each needs.
_X86_LEVELS = (
    ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
    ("x86-64-v3", frozenset({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"})),
)


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def target_flags(march: str) -> list[str]:
    """The flags that build the op for the CPU `march` names (a GCC -march value; `native` is this
    one), with the extensions TensorFlow's headers break on turned off where the compiler knows them."""
    extensions = _EIGEN_BREAKING_EXTENSIONS if _is_x86() else ()
    return [f"-march={march}", *(flag for flag in extensions if compiler_accepts(_compiler(), flag))]


@functools.cache
def compiler_accepts(compiler: str, flag: str) -> bool:
    """Whether `compiler` takes `flag` (it preprocesses an empty file with it; an unknown option
    is an error in GCC and clang). False when the compiler cannot be run at all."""
    try:
        probe = subprocess.run([compiler, flag, "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                               capture_output=True, check=False)
    except OSError:
        return False
    return probe.returncode == 0


def build_targets(flags: frozenset[str]) -> list[tuple[str, list[str]]]:
    """(name, flags) to try in turn: this exact CPU, the best generic level its `flags` (from
    /proc/cpuinfo) allow, and the compiler's default target, which builds wherever anything does."""
    targets = [("this CPU (-march=native)", target_flags("native"))]
    if _is_x86():
        targets += [(level, [f"-march={level}"]) for level, needs in _X86_LEVELS if needs <= flags][:1]
    return [*targets, ("the compiler's default target", [])]


def compile_command(output: str, target: list[str], *, shared: bool = True) -> list[str]:
    """The compiler's command line for one target (`shared=False`: compile to an object only)."""
    # libtensorflow_cc holds XLA's custom-call registry (native_matmul.cc registers with it);
    # `shared=False` links the sources' objects into one relocatable object, no library.
    link = (["-shared", *tf.sysconfig.get_link_flags(), "-l:libtensorflow_cc.so.2"] if shared
            else ["-r", "-nostdlib"])
    return [_compiler(), *map(str, SOURCES), "-o", output, "-fPIC", "-O3", *target, "-w",
            *tf.sysconfig.get_compile_flags(), *link]


def first_error(stderr: str) -> str:
    """The compiler's first `error:` line as `file:line: error: text`, the file relative to
    TensorFlow's headers or to verne's kernels (a linker's summary line yields the line before it)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "error:" not in line:
            continue
        if line.startswith("collect2:") and index > 0:
            line = lines[index - 1]
        line = re.sub(r"^([^:\s]+):(\d+):\d+:", r"\1:\2:", line)  # drop the column
        for root in (tf.sysconfig.get_include(), str(KERNELS)):
            line = line.replace(root.rstrip("/") + "/", "")
        return line
    return lines[-1] if lines else "no output"


def _compiler_version() -> str:
    try:
        result = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return (result.stdout.splitlines() or [""])[0]


def library_path() -> pathlib.Path:
    key = hashlib.sha256()
    targets = build_targets(cpu_flags())
    sources = (path.read_bytes() for path in (*SOURCES, *HEADERS))
    for part in (*sources, tf.__version__, _compiler(), _compiler_version(),
                 *(flag for _, target in targets for flag in compile_command("", target)),
                 cpu_model(), *sorted(cpu_flags())):  # -march=native also tunes for the model
        key.update(part if isinstance(part, bytes) else part.encode())
    return cache_dir() / f"native_ops-{key.hexdigest()[:16]}.so"


class BuildError(RuntimeError):
    """No target built; the message is the compiler's first error line."""


class CompilerKilled(RuntimeError):
    """The compiler died of a signal (the OOM killer's SIGKILL, a SIGTERM): nothing is known about
    whether the op builds, so nothing is remembered and the next run builds again."""


# How GCC's driver (`g++: fatal error: Killed signal terminated program cc1plus`) and clang's
# (`clang++: error: unable to execute command: Killed`, `... failed due to signal`) report a
# compiler process that a signal killed: the driver itself then exits normally, with status 1.
_KILLED = re.compile(r"signal terminated program|unable to execute command: Killed|failed due to signal")


def killed_by(returncode: int, stderr: str) -> str | None:
    """What killed the compiler (e.g. "SIGKILL"), or None if it ran to its end."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    match = _KILLED.search(stderr)
    if match is None:
        return None
    line = next(line.strip() for line in stderr.splitlines() if _KILLED.search(line))
    return "SIGKILL" if "Killed" in line else line


def build(path: pathlib.Path) -> str | None:
    """Compiles the library to `path`, trying `build_targets` in turn, each through a temporary
    name (a concurrent or interrupted build never leaves a half-written library where a loader
    would find it). Returns None when it built for this exact CPU, else a one-line note on what
    it built for and why; raises BuildError when no target builds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = os.path.join(scratch, path.name)
        for name, target in build_targets(cpu_flags()):
            result = subprocess.run(compile_command(partial, target), capture_output=True, text=True,
                                    check=False)
            if result.returncode == -signal.SIGINT:
                # Ctrl-C reached the compiler (its process group's signal): the user's interrupt,
                # even where Python's own KeyboardInterrupt did not surface; no other target.
                raise KeyboardInterrupt
            killed = killed_by(result.returncode, result.stderr)
            if killed is not None:
                # Out of memory (the OOM killer's SIGKILL) or stopped from outside: another target
                # would meet the same fate, and a later run may well build.
                hint = " (out of memory?)" if killed == "SIGKILL" else ""
                raise CompilerKilled(f"the compiler was killed by {killed}{hint}")
            if result.returncode == 0:
                os.replace(partial, path)
                return f"built for {name}, as the build for this CPU failed: {errors[0]}" if errors else None
            errors.append(first_error(result.stderr) if result.stderr.strip()
                          else f"{_compiler()} exited with {result.returncode}")
    raise BuildError(errors[-1])


@functools.cache
def load() -> object | None:
    """The loaded op module, or None when native kernels are off, or cannot be built or used here."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if tf.config.list_physical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return None  # CPU kernels only: accelerators run the portable kernels
    compiler = _compiler()
    if shutil.which(compiler) is None:
        _say(f"no C++ compiler ({compiler}) to build the native CPU kernels: using the slower "
             "TensorFlow ones (install g++ for the fast ones)")
        return None
    path = library_path()
    failed = path.with_suffix(".failed")
    try:
        if failed.exists():
            return _unavailable(failed.read_text().strip(), failed)
        if not path.exists():
            _say(f"building the native CPU kernels for this machine (once, ~15 s): {path}")
            note = build(path)
            if note:
                _say(note)
        return tf.load_op_library(str(path))
    except BuildError as error:
        _write_atomic(failed, str(error))
        return _unavailable(str(error), failed)
    except CompilerKilled as error:
        _say(f"native CPU kernels not built this time ({error}): using the slower TensorFlow ones "
             f"for this run; the next run builds again (or set {ENV_SWITCH}=0 to skip the build)")
        return None
    except (OSError, tf.errors.NotFoundError) as error:
        return _unavailable(str(error).strip().splitlines()[0], None)


def _unavailable(reason: str, failed: pathlib.Path | None) -> None:
    again = f"; delete {failed} to build again" if failed else ""
    _say(f"native CPU kernels unavailable ({_compiler()}: {reason}): using the slower TensorFlow ones "
         f"(install or update g++, or set {ENV_SWITCH}=0 to skip the build{again})")


def _write_atomic(path: pathlib.Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    partial.write_text(text + "\n")
    os.replace(partial, path)


def _say(message: str) -> None:
    print(f"verne: {message}", file=sys.stderr, flush=True)


def available() -> bool:
    return load() is not None


@functools.cache
def bf16_isa() -> str:
    """What `compute_dtype=tf.bfloat16` runs the per-step products on here: "amx", "avx512_bf16",
    or "none" (float32: the CPU has no bfloat16 dot products, or the native op is unavailable)."""
    ops = load()
    if ops is None:
        return "none"
    with tf.init_scope():  # eagerly, also when asked while a function is traced
        return ops.verne_bf16_isa().numpy().decode()


def describe() -> str:
    """One line naming the recurrence the layers run here (for logs and benchmark headers)."""
    if load() is None:
        return "TensorFlow ops (tf.while_loop kernels)"
    isa = bf16_isa()
    bf16 = ("float32 (this CPU has no bfloat16 dot products)" if isa == "none" else
            {"amx": "bfloat16 on AMX tiles", "avx512_bf16": "bfloat16 with AVX512-BF16"}[isa])
    return (f"verne's native C++ ops (trainer/kernels/native_recurrences.cc); per-step products "
            f"under compute dtype bfloat16: {bf16}")


def _op_dtype(compute_dtype: tf.DType) -> tf.DType:
    # bfloat16 is the one 16-bit type the op computes in: float16 has no fast CPU dot product.
    return tf.bfloat16 if compute_dtype == tf.bfloat16 else tf.float32


def lstm_sequence_native(
    x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Same contract as `lstm_sequence_reference`, one op each way. With `compute_dtype=tf.bfloat16`
    the per-step products h_{t-1} @ W_h and dz @ W_hᵀ take bfloat16 inputs with float32
    accumulation where the CPU has bfloat16 dot products (`bf16_isa()`), float32 elsewhere; state,
    gate math and W_h itself stay float32. `compute_dtype` also sets the dtype of the weight
    gradient's one large matmul."""
    ops = load()
    w_h = tf.convert_to_tensor(w_h)
    op_dtype = _op_dtype(compute_dtype)

    @tf.custom_gradient
    def run(x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor):  # noqa: ANN202
        outputs, cs, gates, c_T = ops.verne_lstm_sequence(x_proj, h0, c0, w_h, compute_dtype=op_dtype)

        def grad(d_out: tf.Tensor | None, dh_T: tf.Tensor | None, dc_T: tf.Tensor | None):  # noqa: ANN202
            dz, dh0, dc0 = ops.verne_lstm_sequence_grad(
                h0, c0, w_h, cs, gates, zeros_if_none(d_out, outputs), zeros_if_none(dh_T, h0),
                zeros_if_none(dc_T, c0), compute_dtype=op_dtype)
            return dz, dh0, dc0, _weight_grad(h0, outputs, dz, compute_dtype)

        return (outputs, outputs[:, -1], c_T), grad

    return run(x_proj, h0, c0, w_h)


def gru_sequence_native(
    x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Same contract as `gru_sequence_reference`, one op each way (`compute_dtype` as in
    `lstm_sequence_native`)."""
    ops = load()
    w_h, b_h = tf.convert_to_tensor(w_h), tf.convert_to_tensor(b_h)
    op_dtype = _op_dtype(compute_dtype)

    @tf.custom_gradient
    def run(x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor):  # noqa: ANN202
        outputs, gates = ops.verne_gru_sequence(x_proj, h0, w_h, b_h, compute_dtype=op_dtype)

        def grad(d_out: tf.Tensor | None, dh_T: tf.Tensor | None):  # noqa: ANN202
            dx, dhz, dh0 = ops.verne_gru_sequence_grad(h0, w_h, outputs, gates, zeros_if_none(d_out, outputs),
                                                       zeros_if_none(dh_T, h0), compute_dtype=op_dtype)
            return dx, dh0, _weight_grad(h0, outputs, dhz, compute_dtype), tf.reduce_sum(dhz, axis=[0, 1])

        return (outputs, outputs[:, -1]), grad

    return run(x_proj, h0, w_h, b_h)


def _weight_grad(h0: tf.Tensor, outputs: tf.Tensor, d_pre: tf.Tensor, compute_dtype: tf.DType) -> tf.Tensor:
    """dW_h for the whole window in ONE matmul: h_{t-1} [B*T, H]ᵀ @ d(pre-activation) [B*T, G*H]."""
    units, width = h0.shape[-1], d_pre.shape[-1]
    h_prev = tf.concat([h0[:, None], outputs[:, :-1]], axis=1)
    dw = tf.matmul(cast(tf.reshape(h_prev, [-1, units]), compute_dtype),
                   cast(tf.reshape(d_pre, [-1, width]), compute_dtype), transpose_a=True)
    return cast(dw, tf.float32)


# XlaCallModule's version 4: StableHLO with compatibility guarantees and a platform list, which
# TensorFlow 2.20 and 2.21 both read.
_CALL_MODULE_VERSION = 4


def _f32_tensor_type(shape: list[int]) -> str:
    return "tensor<" + "x".join(map(str, shape)) + "xf32>"


def _xla_product(a: tf.Tensor, b: tf.Tensor, transpose_a: bool = False,
                 transpose_b: bool = False) -> tf.Tensor:
    """op(a) @ op(b) for float32 2-D a, b of static shape, as the XLA custom call
    native_matmul.cc registers: bfloat16 products, float32 sums and result. Only inside a function
    XLA compiles (tf2xla's op has no TensorFlow kernel)."""
    # The call is written in StableHLO for tf2xla's XlaCallModule (what jax2tf emits), not with
    # XlaCustomCallV2: only a StableHLO custom call can ask for XLA's FFI (api_version 4), whose
    # handlers receive XLA's intra-op thread pool (native_matmul.cc says why that matters).
    from tensorflow.compiler.tf2xla.python import xla

    m, n = a.shape[1 if transpose_a else 0], b.shape[0 if transpose_b else 1]
    a_type, b_type, c_type = _f32_tensor_type(a.shape), _f32_tensor_type(b.shape), _f32_tensor_type([m, n])
    flags = f"transpose_a = {str(transpose_a).lower()}, transpose_b = {str(transpose_b).lower()}"
    module = (f"module @verne_product {{ func.func public @main(%a: {a_type}, %b: {b_type}) -> {c_type} {{ "
              f"%c = stablehlo.custom_call @verne_bf16_matmul(%a, %b) {{api_version = 4 : i32, "
              f"backend_config = {{{flags}}}}} : ({a_type}, {b_type}) -> {c_type} "
              f"return %c : {c_type} }} }}")
    return xla.call_module([a, b], version=_CALL_MODULE_VERSION, module=module, Tout=[tf.float32],
                           Sout=[[m, n]], platforms=["CPU"])[0]


def xla_bf16_matmul(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """x [rows, in] @ w [in, out] (float32, static shapes) in bfloat16 with float32 sums, forward
    and backward (dx = dy @ wᵀ, dw = xᵀ @ dy, the same kernel), for an XLA-compiled step."""

    @tf.custom_gradient
    def run(x: tf.Tensor, w: tf.Tensor):  # noqa: ANN202
        def grad(dy: tf.Tensor):  # noqa: ANN202
            return _xla_product(dy, w, transpose_b=True), _xla_product(x, dy, transpose_a=True)

        return _xla_product(x, w), grad

    return run(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(w, tf.float32))


def causal_attention_native(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, window: int) -> tf.Tensor:
    """softmax(q kᵀ + causal window mask) v for each head of a window on its own: q (scaled), k,
    v float32 [B, T, H, D] (T and D multiples of 16), query i seeing keys j with
    0 <= i - j < `window`; the result [B, T, H, D]. One op each way (native_attention.cc),
    bfloat16 products with float32 sums and softmax. Only on a CPU with bfloat16 dot products
    (`bf16_isa()`)."""
    ops = load()

    @tf.custom_gradient
    def run(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor):  # noqa: ANN202
        o, lse = ops.verne_causal_attention(q, k, v, window=window)

        def grad(d_o: tf.Tensor):  # noqa: ANN202
            return ops.verne_causal_attention_grad(q, k, v, o, lse, d_o, window=window)

        return o, grad

    return run(*(tf.convert_to_tensor(t, tf.float32) for t in (q, k, v)))

"""Job-name rules (`%JOB%`) and the shape checks that protect an existing job dir."""

from __future__ import annotations

import pytest

from trainer.errors import UsageError
from trainer.hparams import (
    HParams,
    auto_precision,
    cpu_flags,
    job_name,
    resolve_job_dirs,
    resolve_precision,
    shape_mismatches,
)


def _h(**changes: object) -> HParams:
    base = HParams(data_prefix="jules", language_model="word", layers=4, lstm_state_size=120)
    return base.replace(**changes)


def test_seed_form_of_the_job_name() -> None:
    assert job_name(_h()) == "jules-120-states-4-layers-word"
    assert job_name(_h(layer_norm=True)) == "jules-120-states-4-layers-norm-word"


def test_only_shape_changes_change_the_name() -> None:
    base = job_name(_h())
    for free in (dict(learning_rate=0.1), dict(unroll_steps=7), dict(epochs=9), dict(dropout=0.5),
                 dict(batch_size=3), dict(optimizer="sgd"), dict(max_steps=5)):
        assert job_name(_h(**free)) == base, free
    assert job_name(_h(cell="gru")) == base + "-gru"
    assert job_name(_h(embedding_size=64)) == base + "-emb64"
    assert job_name(_h(tie_embeddings=True)) == base + "-tied"


def test_resolve_replaces_job_in_both_dirs() -> None:
    resolved = resolve_job_dirs(_h(job_dir="gs://b/job/%JOB%", summary_dir="tb/%JOB%/x"))
    assert resolved.job_dir == "gs://b/job/jules-120-states-4-layers-word"
    assert resolved.summary_dir == "tb/jules-120-states-4-layers-word/x"


def test_job_name_needs_the_language_model() -> None:
    with pytest.raises(ValueError, match="language_model"):
        job_name(HParams(data_prefix="x"))


def test_shape_mismatches_name_the_flags() -> None:
    assert shape_mismatches(_h(), _h(learning_rate=1.0, unroll_steps=3)) == []
    assert shape_mismatches(_h(), _h(layers=2)) == ["--layers: job dir has 4, flags give 2"]


def test_hparams_json_round_trip_and_unknown_keys() -> None:
    h = _h(dropout=0.25)
    assert HParams.from_json(h.to_json()) == h
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        HParams.from_json('{"layerz": 3}')


def test_auto_precision_per_device_for_recurrent_cells_only() -> None:
    bf16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert auto_precision("lstm", bf16, has_gpu=False) == "bfloat16"
    assert auto_precision("gru", frozenset({"amx_bf16", "amx_tile"}), has_gpu=False) == "bfloat16"
    assert auto_precision("lstm", frozenset({"avx2", "avx512f"}), has_gpu=False) == "float32"
    assert auto_precision("lstm", bf16, has_gpu=True) == "float16"
    assert auto_precision("gru", frozenset(), has_gpu=False, has_tpu=True) == "bfloat16"
    for zoo in ("mlstm", "mogrifier", "qrnn"):
        for gpu, tpu in ((False, False), (True, False), (False, True)):
            assert auto_precision(zoo, bf16, has_gpu=gpu, has_tpu=tpu) == "float32", zoo
    # The transformer as the recurrent cells, but float32 where XLA compiles its whole step on
    # the CPU (XLA's CPU dot gained nothing from bfloat16: trainer/xla.py).
    assert auto_precision("transformer", bf16, has_gpu=False, xla="fusion") == "bfloat16"
    assert auto_precision("transformer", bf16, has_gpu=False, xla="step") == "float32"
    # verne's own bfloat16 matmul in the compiled step (kernels.xla_bf16_matmul_here), where the CPU has one
    assert auto_precision("transformer", bf16, has_gpu=False, xla="step", xla_bf16_matmul=True) == "bfloat16"
    assert auto_precision("transformer", frozenset({"avx2"}), has_gpu=False, xla="step",
                          xla_bf16_matmul=True) == "float32"
    assert auto_precision("transformer", bf16, has_gpu=True, xla="off") == "float16"


def test_cpu_flags_reads_the_flags_line(tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 sse\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(cpuinfo)) == frozenset({"fpu", "avx512_bf16", "sse"})
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_resolve_precision_leaves_only_concrete_values() -> None:
    assert HParams().precision == "auto"
    assert resolve_precision(HParams()).precision in ("float32", "bfloat16")
    assert resolve_precision(HParams(precision="float32")).precision == "float32"
    assert resolve_precision(HParams(cell="qrnn")).precision == "float32"


def test_bfloat16_is_refused_for_float32_only_cells() -> None:
    HParams(cell="gru", precision="bfloat16").validate()
    HParams(cell="lstm", precision="float16").validate()
    HParams(cell="transformer", precision="bfloat16").validate()
    with pytest.raises(ValueError, match="--precision=bfloat16: --cell=mlstm"):
        HParams(cell="mlstm", precision="bfloat16").validate()
    with pytest.raises(ValueError, match="--precision=float16: --cell=qrnn"):
        HParams(cell="qrnn", precision="float16").validate()


def test_xla_auto_compiles_a_small_transformer_whole_and_fuses_a_large_one() -> None:
    from trainer import xla

    baby = HParams(cell="transformer", layers=4, d_model=128, heads=4, vocab_size=65, batch_size=12,
                   unroll_steps=64, max_context=64)
    small = baby.replace(layers=6, d_model=384, heads=6, batch_size=32, unroll_steps=256, max_context=256)
    assert xla.resolve(baby).xla == "step" and xla.resolve(small).xla == "fusion"
    assert xla.resolve(baby, replicas=2).xla == "fusion"  # no cross-device reduction inside XLA
    assert xla.resolve(baby, accelerator=True).xla == "off"
    assert xla.resolve(HParams(vocab_size=65)).xla == "off"  # the recurrent cells
    assert xla.resolve(baby.replace(xla="off")).xla == "off"  # a given mode stays
    with pytest.raises(ValueError, match="--xla=step compiles the transformer's step"):
        HParams(cell="lstm", xla="step").validate()


def test_batch_splits_auto_is_two_only_for_a_transformer_step_on_a_multi_core_cpu() -> None:
    from trainer import xla

    for mode in ("step", "fusion"):  # the transformer's modes
        assert xla.auto_batch_splits(mode, 12, on_cpu=True, cores=2) == 2
        assert xla.auto_batch_splits(mode, 12, on_cpu=True, cores=1) == 1
        assert xla.auto_batch_splits(mode, 7, on_cpu=True, cores=8) == 1  # no equal halves
        assert xla.auto_batch_splits(mode, 12, on_cpu=False, cores=8) == 1
    assert xla.auto_batch_splits("off", 12, on_cpu=True, cores=8) == 1
    baby = HParams(cell="transformer", layers=4, d_model=128, heads=4, vocab_size=65, batch_size=12,
                   unroll_steps=64, max_context=64)
    assert xla.resolve(baby, accelerator=True).batch_splits == 1
    assert xla.resolve(baby.replace(batch_splits=3)).batch_splits == 3  # a given count stays
    assert xla.resolve(HParams()).batch_splits == 1  # the LSTM: a graph, not measured
    with pytest.raises(ValueError, match="--batch_splits=5: must divide --batch_size=12"):
        baby.replace(batch_splits=5).validate()
    with pytest.raises(ValueError, match="--batch_splits=-1: must be >= 0"):
        baby.replace(batch_splits=-1).validate()
    with pytest.raises(UsageError, match="--batch_splits=4: must divide each of the 2 replicas' 6 streams"):
        xla.resolve(baby.replace(batch_splits=4), replicas=2)


def test_xla_fusion_turns_clustering_on_only_inside_and_the_cpu_flags_are_set_at_import() -> None:
    import os

    import tensorflow as tf

    from trainer import xla

    # Read by TensorFlow once, at its first device set-up: trainer/__init__ sets them.
    assert "--tf_xla_cpu_global_jit" in os.environ["TF_XLA_FLAGS"]
    assert "--tf_xla_ops_to_cluster=FUSIBLE" in os.environ["TF_XLA_FLAGS"]
    before = tf.config.optimizer.get_jit()
    with xla.fusion(False):
        assert tf.config.optimizer.get_jit() == before
    with xla.fusion(True):
        assert tf.config.optimizer.get_jit() == "autoclustering"
    assert tf.config.optimizer.get_jit() == before

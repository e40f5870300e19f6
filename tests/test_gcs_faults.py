"""Cloud Storage misbehaving under a training job on gs://: 503s and timeouts, injected by the test
proxy (tests/gcs/proxy.py) in front of the emulator, while the shards are read, while a checkpoint
is saved and while the job restores. Each is retried (trainer.storage) and the job ends exactly
where an uninterrupted local run with the same flags ends: no step lost, none trained twice, the
newest checkpoint restored (not taken for damaged). Summaries whose upload fails are retried too.

TensorFlow's own per-request retries are off here (GCS_RETRY_CONFIG_MAX_RETRIES=0), so each
injected fault reaches verne's retries; its idle timeout is 2 s, so a 3 s stall is a timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gcs.server import GcsServer
from test_multiworker import _finish

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

MODEL = ["--layers=1", "--lstm_state_size=16", "--embedding_size=8", "--unroll_steps=8", "--batch_size=4",
         "--save_checkpoints_steps=10", "--eval_every=0", "--sample_every=0", "--log_every=10",
         "--learning_rate=0.01", "--seed=5"]
FINAL_STEP = 40


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in env.items() if k not in ("TF_CONFIG", "CLUSTER_SPEC")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _faulty(gcs: GcsServer, args: list[str], rules: list[dict], retried: list[str]) -> str:
    """Runs trainer.task with `rules` injected; every rule must have fired as often as it says, and
    a 503 and a timeout (curl's abort) must each have been retried while doing each of `retried`."""
    assert gcs.proxy is not None
    gcs.proxy.faults(rules)
    try:
        env = gcs.subprocess_env()
        env.update(GCS_RETRY_CONFIG_MAX_RETRIES="0", GCS_REQUEST_IDLE_TIMEOUT_SECS="2",
                   VERNE_GCS_RETRIES="5,0.2,1")
        output = _finish(_start(args, env))
        fired = gcs.proxy.faults()
    finally:
        gcs.proxy.faults([])
    assert [rule["fired"] for rule in fired] == [rule["times"] for rule in rules], (fired, output[-3000:])
    for doing in retried:
        for fault in ("HTTP response code 503", "libcurl code 42"):
            said = re.search(rf": {doing} failed \(.*{fault}.*\); retrying in", output)
            assert said, (doing, fault, output[-3000:])
    assert "damaged" not in output, output[-3000:]
    return output


def _state(reader: object) -> dict[str, np.ndarray]:
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model", "optimizer", "step", "epoch", "position", "carry"))}


def _download(gcs: GcsServer, url: str, to: Path) -> Path:
    bucket, prefix = url.removeprefix("gs://").split("/", 1)
    for blob in gcs.storage_client().list_blobs(bucket, prefix=prefix + "/"):
        if not blob.name.endswith("/"):
            target = to / blob.name.removeprefix(prefix + "/")
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target))
    return to


def _fail(match: str, times: int = 2) -> list[dict]:
    """`times` HTTP 503s, then one timeout, for requests matching `match`."""
    return [{"match": match, "status": 503, "times": times}, {"match": match, "stall": 3, "times": 1}]


def test_503s_and_timeouts_at_read_save_and_restore_lose_no_step(
        gcs_server: GcsServer, gcs_bucket: str, tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    bucket = gcs_server.storage_client().bucket(gcs_bucket.removeprefix("gs://"))
    for path in Path(data_dir).iterdir():
        bucket.blob(f"data/{path.name}").upload_from_filename(str(path))
    name = gcs_bucket.removeprefix("gs://")
    common = [f"--data_dir={gcs_bucket}/data", f"--data_prefix={prefix}", f"--job-dir={gcs_bucket}/job",
              *MODEL]
    whole = _start([f"--data_dir={data_dir}", f"--data_prefix={prefix}", f"--job-dir={tmp_path / 'whole'}",
                    *MODEL, f"--max_steps={FINAL_STEP}"], dict(os.environ))

    # First run: the train shards' first read, and the upload of checkpoint 10, fail 3 times each.
    shard_read = rf"GET storage\.googleapis\.com /{name}/data%2F{prefix}\.train-"
    save = rf"(POST|PUT) www\.googleapis\.com /upload/storage/v1/b/{name}/o\?.*name=job%2Fckpt-10"
    first = _faulty(gcs_server, [*common, "--max_steps=20"], [*_fail(shard_read), *_fail(save)],
                   ["reading the shards", "saving a checkpoint"])
    assert "from scratch" in first

    # Second run: reading checkpoint 20 back fails 3 times; the job resumes from it all the same.
    restore = rf"GET storage\.googleapis\.com /{name}/job%2Fckpt-20\."
    second = _faulty(gcs_server, [*common, f"--max_steps={FINAL_STEP}"], _fail(restore),
                    ["reading a checkpoint"])
    assert re.search(r"Resuming gs://\S+/job from gs://\S+/job/ckpt-20: step 20,", second), second[-3000:]

    _finish(whole)
    import tensorflow as tf

    job = _download(gcs_server, f"{gcs_bucket}/job", tmp_path / "job")
    assert {f"ckpt-{s}.index" for s in (10, 20, 40)} <= {p.name for p in job.glob("ckpt-*.index")}
    assert not [p for p in job.rglob("*") if "temp" in p.name or ".tmp-" in p.name]
    got = _state(tf.train.load_checkpoint(str(job / f"ckpt-{FINAL_STEP}")))
    expected = _state(tf.train.load_checkpoint(str(tmp_path / "whole" / f"ckpt-{FINAL_STEP}")))
    assert got.keys() == expected.keys() and int(got["step/.ATTRIBUTES/VARIABLE_VALUE"]) == FINAL_STEP
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)



SUMMARIES = """
import sys
import tensorflow as tf
from trainer.summaries import Summaries
summaries = Summaries(sys.argv[1], "char")
summaries.train(1, 2.0, 0.1, 1.0, 100.0)
summaries.flush()
print("FAULTS NOW", flush=True)
sys.stdin.readline()
summaries.eval(2, 1.5)  # flushes: the upload of the event file fails
summaries.train(3, 1.0, 0.1, 1.0, 100.0)
summaries.close()
(events,) = tf.io.gfile.glob(sys.argv[1] + "/events*")
print(sorted({(e.step, v.tag) for e in tf.compat.v1.train.summary_iterator(events) for v in e.summary.value
              if v.tag.endswith("/loss")}))
"""


def test_summaries_survive_failed_uploads(gcs_server: GcsServer, gcs_bucket: str) -> None:
    # The event file is uploaded whole at each flush, so a flush retried after 503s loses nothing.
    env = gcs_server.subprocess_env()
    env.update(GCS_RETRY_CONFIG_MAX_RETRIES="0", VERNE_GCS_RETRIES="4,0.1,0.2", TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen([sys.executable, "-c", SUMMARIES, f"{gcs_bucket}/tb"], cwd=REPO, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    assert gcs_server.proxy is not None
    try:
        for line in process.stdout:
            if line.startswith("FAULTS NOW"):
                break
        gcs_server.proxy.faults([{"match": rf"(POST|PUT) www\.googleapis\.com .*{gcs_bucket[5:]}/o\?.*tb%2F",
                                  "status": 503, "times": 2}])
        output, _ = process.communicate("go\n", timeout=300)
        fired = gcs_server.proxy.faults()
    finally:
        gcs_server.proxy.faults([])
    assert process.returncode == 0, output[-3000:]
    assert [rule["fired"] for rule in fired] == [2] and "writing summaries failed" in output, output[-3000:]
    assert "[(1, 'train/loss'), (2, 'eval/loss'), (3, 'train/loss')]" in output, output[-3000:]


EXPORTS = """
import sys
import numpy as np
import tensorflow as tf
from trainer import data, export
from trainer.hparams import HParams
from trainer.models import build_model
metadata = data.read_metadata(sys.argv[2], sys.argv[3])
model = build_model(HParams(language_model="char", vocab_size=metadata.vocab_size, layers=1,
                            lstm_state_size=8, embedding_size=4))
export.export_model(model, metadata, sys.argv[1])
for variable in model.trainable_variables:  # the second export must replace the first one whole
    variable.assign_add(tf.ones_like(variable))
export.export_model(model, metadata, sys.argv[1])
loaded = tf.saved_model.load(sys.argv[1])
assert len(loaded.weights) == len(model.variables)
for saved, variable in zip(loaded.weights, model.variables):
    np.testing.assert_array_equal(saved.numpy(), variable.numpy())
print("EXPORTS MATCH", flush=True)
"""


def test_exports_survive_503s_and_timeouts(gcs_server: GcsServer, gcs_bucket: str, tmp_path: Path,
                                           make_data_dir) -> None:
    # Every step of an export on gs:// fails a few times: the write under its temporary name, the
    # move into place (stopped after some of its objects were moved), the move of the older export
    # aside and its removal. Each is retried on its own; the export that remains is the second one,
    # whole, and no temporary or older copy is left.
    data_dir, prefix, _ = make_data_dir(tmp_path)
    name = gcs_bucket.removeprefix("gs://")
    api = rf"www\.googleapis\.com /storage/v1/b/{name}/o/"
    rules = [*_fail(rf"POST www\.googleapis\.com /upload/storage/v1/b/{name}/o\?.*name=out%2Fexport\.tmp-"
                    r"[0-9a-f]+%2Fsaved_model\.pb"),
             *_fail(rf"POST {api}out%2Fexport\.tmp-\w+%2Fvariables%2Fvariables\.index/rewriteTo/", times=1),
             *_fail(rf"POST {api}out%2Fexport%2Fsaved_model\.pb/rewriteTo/b/{name}/o/out%2Fexport\.old-",
                    times=1),
             *_fail(rf"DELETE {api}out%2Fexport\.old-\w+%2Fsaved_model\.pb", times=1)]
    assert gcs_server.proxy is not None
    gcs_server.proxy.faults(rules)
    try:
        env = gcs_server.subprocess_env()
        env.update(GCS_RETRY_CONFIG_MAX_RETRIES="0", GCS_REQUEST_IDLE_TIMEOUT_SECS="2",
                   VERNE_GCS_RETRIES="5,0.2,1", TF_CPP_MIN_LOG_LEVEL="2")
        done = subprocess.run([sys.executable, "-c", EXPORTS, f"{gcs_bucket}/out/export", data_dir, prefix],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        fired = gcs_server.proxy.faults()
    finally:
        gcs_server.proxy.faults([])
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "EXPORTS MATCH" in output and "by hand" not in output, output[-3000:]
    assert [rule["fired"] for rule in fired] == [rule["times"] for rule in rules], (fired, output[-3000:])
    for fault in ("HTTP response code 503", "libcurl code 42"):
        said = re.search(rf": exporting the model failed \(.*{fault}.*\); retrying in", output)
        assert said, (fault, output[-3000:])
    names = [blob.name for blob in gcs_server.storage_client().list_blobs(name, prefix="out/")]
    assert "out/export/saved_model.pb" in names, names
    assert not [n for n in names if ".tmp-" in n or ".old-" in n], names

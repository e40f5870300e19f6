"""The gs:// test infrastructure: every client in the stack really round-trips through the
local GCS emulator (tests/gcs). Each test checks what one client wrote with a different client,
so nothing passes by reading back a local cache. TensorFlow in a subprocess (the way verne's
entry points run) is covered by test_gcs_chain.py."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import textwrap

from gcs.proxy import _read_chunked
from gcs.server import GcsServer


def _blobs(gcs: GcsServer, url: str, prefix: str = "") -> dict[str, bytes]:
    bucket = url.removeprefix("gs://")
    return {b.name: b.download_as_bytes() for b in gcs.storage_client().list_blobs(bucket, prefix=prefix)}


def test_google_cloud_storage_lists_what_it_wrote(gcs_server: GcsServer, gcs_bucket: str) -> None:
    bucket = gcs_server.storage_client().bucket(gcs_bucket.removeprefix("gs://"))
    for name in ("a/1.txt", "a/2.txt", "b/3.txt"):
        bucket.blob(name).upload_from_string(name.encode())
    assert sorted(b.name for b in bucket.list_blobs(prefix="a/")) == ["a/1.txt", "a/2.txt"]
    assert bucket.blob("b/3.txt").download_as_bytes() == b"b/3.txt"


def test_tensorflow_gfile_round_trips(gcs_in_process: GcsServer, gcs_bucket: str) -> None:
    import tensorflow as tf

    gfile, root = tf.io.gfile, gcs_bucket
    gfile.makedirs(f"{root}/dir/sub")
    assert gfile.isdir(f"{root}/dir/sub")
    with gfile.GFile(f"{root}/dir/sub/hello.txt", "w") as f:
        f.write("hello, emulator\n" * 1000)
    assert gfile.exists(f"{root}/dir/sub/hello.txt")
    assert not gfile.exists(f"{root}/dir/sub/missing.txt")
    gfile.copy(f"{root}/dir/sub/hello.txt", f"{root}/dir/copy.txt")
    gfile.rename(f"{root}/dir/copy.txt", f"{root}/dir/renamed.txt", overwrite=True)
    assert sorted(gfile.glob(f"{root}/dir/*.txt")) == [f"{root}/dir/renamed.txt"]
    with gfile.GFile(f"{root}/dir/renamed.txt") as f:
        assert f.read() == "hello, emulator\n" * 1000
    # The emulator itself holds the objects, seen through another client.
    stored = _blobs(gcs_in_process, root, "dir/")
    assert stored["dir/sub/hello.txt"] == b"hello, emulator\n" * 1000
    assert "dir/copy.txt" not in stored and "dir/renamed.txt" in stored
    # Renaming a directory (how exports replace an older one) asks for the bucket's layout first.
    gfile.rename(f"{root}/dir/sub", f"{root}/dir/moved")
    assert sorted(_blobs(gcs_in_process, root, "dir/moved/")) == ["dir/moved/", "dir/moved/hello.txt"]
    assert not gfile.exists(f"{root}/dir/sub/hello.txt")


def test_tensorflow_tfrecords_summaries_and_checkpoints(gcs_in_process: GcsServer, gcs_bucket: str) -> None:
    import numpy as np
    import tensorflow as tf

    records = [bytes([i % 256]) * (i * 37) for i in range(200)]
    path = f"{gcs_bucket}/data/shard.tfrecord.gz"
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for record in records:
            writer.write(record)
    assert [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP")] == records

    writer = tf.summary.create_file_writer(f"{gcs_bucket}/tb")
    with writer.as_default():
        tf.summary.scalar("loss", 2.5, step=7)
    writer.close()
    (event_file,) = tf.io.gfile.glob(f"{gcs_bucket}/tb/events.out.tfevents.*")
    events = tf.compat.v1.train.summary_iterator(event_file)
    values = [(e.step, v.tag) for e in events for v in e.summary.value]
    assert values == [(7, "loss")]

    variable = tf.Variable(np.arange(12, dtype=np.float32).reshape(3, 4))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), f"{gcs_bucket}/ckpt", max_to_keep=2)
    for step in (1, 2, 3):
        variable.assign_add(tf.ones_like(variable))
        manager.save(checkpoint_number=step)
    assert manager.checkpoints == [f"{gcs_bucket}/ckpt/ckpt-2", f"{gcs_bucket}/ckpt/ckpt-3"]
    assert "ckpt/ckpt-1.index" not in _blobs(gcs_in_process, gcs_bucket, "ckpt/")
    restored = tf.Variable(tf.zeros([3, 4]))
    tf.train.Checkpoint(v=restored).restore(tf.train.latest_checkpoint(f"{gcs_bucket}/ckpt")).assert_consumed()
    np.testing.assert_array_equal(restored.numpy(), np.arange(12).reshape(3, 4) + 3)


def _run(gcs: GcsServer, code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=gcs.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_beam_writes_and_reads_tfrecords_in_a_subprocess(gcs_in_process: GcsServer, gcs_bucket: str) -> None:
    # Sharded sinks finish with a batch copy + delete: the case the test-only patches exist for.
    done = _run(gcs_in_process, f"""
        import apache_beam as beam
        with beam.Pipeline() as p:
            (p | beam.Create([b"record-%d" % i for i in range(40)])
               | beam.io.WriteToTFRecord("{gcs_bucket}/beam/part", file_name_suffix=".tfrecord.gz",
                                         num_shards=3))
        with beam.Pipeline() as p:
            (p | beam.io.ReadFromTFRecord("{gcs_bucket}/beam/part-*")
               | beam.combiners.Count.Globally() | beam.Map(lambda n: print("COUNT", n)))
    """)
    assert "COUNT 40" in done.stdout
    stored = _blobs(gcs_in_process, gcs_bucket, "beam/")
    assert sorted(stored) == [f"beam/part-0000{i}-of-00003.tfrecord.gz" for i in range(3)]

    import tensorflow as tf  # a third client reads Beam's shards, as the trainer will

    read = tf.data.TFRecordDataset(tf.io.gfile.glob(f"{gcs_bucket}/beam/part-*"), compression_type="GZIP")
    assert sorted(r.numpy() for r in read) == sorted(b"record-%d" % i for i in range(40))


def test_beam_text_in_process(gcs_in_process: GcsServer, gcs_bucket: str) -> None:
    import apache_beam as beam

    lines = [f"line {i}" for i in range(30)]
    with beam.Pipeline() as p:
        p | beam.Create(lines) | beam.io.WriteToText(f"{gcs_bucket}/text/out", num_shards=2)
    stored = _blobs(gcs_in_process, gcs_bucket, "text/")
    assert sorted(stored) == ["text/out-00000-of-00002", "text/out-00001-of-00002"]
    assert sorted(b"".join(stored.values()).decode().splitlines()) == sorted(lines)


def test_proxy_refuses_hosts_other_than_google_storage(gcs_server: GcsServer) -> None:
    assert gcs_server.proxy is not None
    port = int(gcs_server.proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 403")


def test_chunked_bodies_are_decoded() -> None:
    body = io.BytesIO(b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\nNEXT")
    assert _read_chunked(body) == b"hello, world"
    assert body.read() == b"NEXT"

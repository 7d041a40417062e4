"""Remote run and checkpoint directories (`gs://`), on a fake `gs://` (tests/fake_gcs.py)
that keeps `gs://bucket/x` in `<tmp>/gcs/bucket/x`."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp

from tests.fake_gcs import fake_gcs
from train import loop, paths
from train.checkpoint import MANIFEST, Checkpointer


def test_paths_keep_uris_and_make_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
  assert str(paths.resolve("runs/x")) == str(tmp_path / "runs" / "x")
  assert paths.is_remote("s3://b/k") and not paths.is_remote("runs/gs:/b")
  (tmp_path / "a" / "b").mkdir(parents=True)
  for name in ("a/1", "a/b/2", "3"):
    (tmp_path / name).write_text(name)
  assert paths.files(paths.resolve(".")) == ["3", "a/1", "a/b/2"]


def test_checkpoints_on_gs_are_checksummed_rotated_and_moved_aside_when_damaged(
    tmp_path, monkeypatch):
  """The Checkpointer's own file operations on gs:// (Orbax writes the steps): the
  checksums, rotation to the newest 2, a damaged step moved to `damaged/` in the bucket
  with a fallback to the step before; nothing is written under the working directory."""
  bucket = tmp_path / "gcs" / "bucket"
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
  with fake_gcs(tmp_path / "gcs", monkeypatch):
    ckpt = Checkpointer("gs://bucket/ckpt", keep=2)
    for step in (1, 2, 3):
      assert ckpt.save(step, {**state, "step": jnp.int32(step)}, flags={"lr": 0.1})
    ckpt.finish()
    assert ckpt.steps() == [2, 3] and ckpt.directory == paths.resolve("gs://bucket/ckpt")
    for step in (2, 3):
      manifest = (bucket / "ckpt" / str(step) / MANIFEST).read_text().splitlines()
      names = sorted(line.split("  ", 1)[1] for line in manifest)
      on_disk = sorted(os.path.relpath(os.path.join(d, n), bucket / "ckpt" / str(step))
                       for d, _, files in os.walk(bucket / "ckpt" / str(step)) for n in files)
      assert names == [n for n in on_disk if n != MANIFEST] and len(names) > 3
      for line in manifest:  # each sum is the file's sha256
        digest, name = line.split("  ", 1)
        data = (bucket / "ckpt" / str(step) / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
    assert ckpt.flags(3) == {"lr": 0.1} and ckpt.verify(3) is None
    data_file = max((p for p in (bucket / "ckpt" / "3" / "default").rglob("*")
                     if p.parent.name == "d"), key=lambda p: p.stat().st_size)  # arrays
    data_file.write_bytes(b"\1" * data_file.stat().st_size)
    lines = []
    assert ckpt.newest_intact(say=lines.append) == 2
    assert "gs://bucket/ckpt/damaged/3" in lines[0] and "does not match its sha256" in lines[0]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    assert int(ckpt.restore(abstract, 2)["step"]) == 2
    ckpt.close()
  assert sorted(os.listdir(bucket / "ckpt")) == ["2", "damaged"]
  assert os.listdir(bucket / "ckpt" / "damaged") == ["3"]
  assert os.listdir(tmp_path / "cwd") == []


def test_metrics_log_on_gs_is_rewritten_whole_and_trimmed_on_resume(tmp_path, monkeypatch):
  """Object stores cannot append: the remote log is written whole on open, every
  `flush_seconds` and on close; a resumed log keeps the records up to its step."""
  path = tmp_path / "gcs" / "bucket" / "run" / "metrics.jsonl"
  with fake_gcs(tmp_path / "gcs", monkeypatch):
    paths.resolve("gs://bucket/run").mkdir(parents=True)  # as the programs do
    log = loop.MetricsLog("gs://bucket/run/metrics.jsonl", None, flush_seconds=3600)
    for step in (1, 2, 3):
      log.write({"step": step, "loss": 1.0 / step})
    assert path.read_text() == ""  # not flushed yet
    log.close()
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
    log = loop.MetricsLog("gs://bucket/run/metrics.jsonl", 2, flush_seconds=0)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
    log.write({"step": 3, "loss": 0.5})  # flushed at once
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 3, "loss": 0.5}
    log.close()
    loop.write_json("gs://bucket/run/summary.json", {"step": 3})
  assert json.loads((path.parent / "summary.json").read_text()) == {"step": 3}

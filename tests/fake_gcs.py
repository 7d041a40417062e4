"""A fake `gs://` for tests: `gs://bucket/a` is the local directory `<root>/bucket/a`.

`etils.epath` reaches `gs://` through fsspec (TensorFlow's gfile is turned off), and here
fsspec's filesystem for it is a `DirFileSystem` over `root`. Orbax reaches `gs://` two more
ways, which the fake replaces too: TensorStore's `gcs` driver (for the arrays; the fake
gives TensorStore a `file` spec under `root` instead) and the google-cloud-storage client
(only to ask whether the bucket has a hierarchical namespace: it has not).
"""

import contextlib
import os

from etils.epath import backend, gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils


class _LocalBucket(DirFileSystem):
  protocol = ("gs", "gcs")  # so that `_strip_protocol` drops the `gs://`


@contextlib.contextmanager
def fake_gcs(root, monkeypatch):
  """While open, `gs://...` paths are files under directory `root` (for epath and Orbax)."""
  os.makedirs(root, exist_ok=True)
  fs = _LocalBucket(path=str(root), fs=LocalFileSystem())

  def tensorstore_spec(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(str(root), bucket, key)}

  with monkeypatch.context() as m:
    m.setattr(gpath, "_is_tf_installed", lambda: False)
    m.setattr(backend.fsspec_backend, "fs", lambda path: fs)
    m.setattr(gcs_utils, "get_kvstore_for_gcs", tensorstore_spec)
    m.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    yield

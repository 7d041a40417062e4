"""Local and remote paths (`gs://bucket/run`, `s3://...`) through `etils.epath`.

A local path is made absolute (Orbax wants absolute paths); a remote one is kept as given
(`os.path.abspath("gs://b/run")` would make it `<cwd>/gs:/b/run`). `etils.epath` reads and
writes `gs://` through TensorFlow's gfile when TensorFlow is installed, else through
fsspec (`pip install gcsfs` for `gs://`, `s3fs` for `s3://`).
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URI (`gs://...`, `s3://...`) rather than a local path."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: absolute if local, as given if remote."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def files(root: epath.Path) -> list[str]:
  """Every file under directory `root`, relative to it (`a/b`), sorted; by listing each
  directory, which every backend does alike (fsspec's walk drops the `gs://`)."""
  out, pending = [], [(root, "")]
  while pending:
    directory, prefix = pending.pop()
    for child in directory.iterdir():
      if child.is_dir():
        pending.append((child, prefix + child.name + "/"))
      else:
        out.append(prefix + child.name)
  return sorted(out)

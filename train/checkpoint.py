"""Orbax checkpoints of the train state: saved every N steps, verified, rotated by us.

A step directory holds Orbax's checkpoint (item `default`), the run's flags (Orbax's
custom metadata, `_CHECKPOINT_METADATA`) and, once the save has finished, `SHA256SUMS`: a
sha256 of every other file in it, in `sha256sum`'s format (`cd ckpt/300 && sha256sum -c
SHA256SUMS` checks it by hand), because Orbax keeps no checksum of its data files.

The directory may be remote (`gs://bucket/run/ckpt`): every file operation here goes
through `etils.epath` (`train.paths`), as Orbax's own do. In a multi-process run every
process makes a `Checkpointer` and calls `save`, `finish`, `restore` alike (Orbax
coordinates them: each process writes its shards, the primary one the metadata and the
commit; a delete waits for every process); only the lead one (`lead=True`, process 0)
writes `SHA256SUMS`, moves damaged steps (the others wait for the move) and removes what
a failed save left.

A step is intact when Orbax recorded its commit and every file matches its checksum (a
step without `SHA256SUMS`, from an older trainer or a save killed just before the sums were
written, counts as intact unverified). Damaged steps are moved to `damaged/` (never
deleted) so that a resumed run falls back to the newest intact one. Old steps are deleted
here, not by Orbax: only once a newer save has finished and been checksummed (a failed save
leaves every earlier step in place), keeping the newest `keep` and, besides, the newest
confirmed one (a finite train step has run from its state).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from etils import epath

from train import paths, validate

MANIFEST = "SHA256SUMS"
DAMAGED = "damaged"


class ResumeError(Exception):
  """No checkpoint to resume from that fits this run (one line saying why)."""


class SaveError(Exception):
  """A save of `step` that failed (disk full, ...): the message says which and why."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(root: epath.Path) -> list[str]:
  """Files under `root`, relative to it, sorted (the manifest itself excluded)."""
  return [name for name in paths.files(root) if name != MANIFEST]


def _remove(path: epath.Path) -> None:
  """Deletes directory `path` if it is there, as far as it can (errors are ignored)."""
  try:
    path.rmtree()
  except OSError:
    pass


def _first_line(error: BaseException, limit: int = 160) -> str:
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text if len(text) <= limit else text[:limit - 1] + "…"


class Checkpointer:
  """An `ocp.CheckpointManager` for one pytree (the train state), with checksums, fallback
  to intact steps and rotation that never loses the newest healthy step.

  Args:
    directory: The checkpoint directory (created if missing); local or remote.
    keep: Newest steps kept (plus the newest confirmed one, see `confirm`).
    every: `due(step)` every this many steps (0: never).
    lead: Whether this process writes the checksums and moves damaged steps (one per job).
  """

  def __init__(self, directory: str, *, keep: int = 3, every: int = 0, lead: bool = True):
    self.directory = paths.resolve(directory)
    self.keep, self.every, self.lead = keep, every, lead
    self._pending: int | None = None  # saved, not yet finished and checksummed
    self._finite: int | None = None  # newest step known to have run finite
    self._syncs = 0  # barriers so far (numbers their names)
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  # reading

  def verify(self, step: int) -> str | None:
    """Why `step` is damaged, or None if it is intact (Orbax's commit record, then every
    file against `SHA256SUMS` where there is one)."""
    root = self.path(step)
    if not root.is_dir():
      return "its directory is missing"
    if next(root.iterdir(), None) is None:
      return "its directory is empty"
    if not ocp.path.step.is_checkpoint_finalized(root):
      return "an unfinished save"
    try:
      committed = self._manager.metadata(step).commit_timestamp_nsecs
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is damage
      return f"unreadable _CHECKPOINT_METADATA: {_first_line(e)}"
    if committed is None:
      return "Orbax recorded no commit (empty, or _CHECKPOINT_METADATA missing)"
    manifest = root / MANIFEST
    if not manifest.exists():
      return None
    with manifest.open() as f:
      for line in filter(str.strip, f):
        digest, _, name = line.rstrip("\n").partition("  ")
        path = root / name
        if not path.is_file():
          return f"{name} is missing"
        if _sha256(path) != digest:
          return f"{name} does not match its sha256 in {MANIFEST}"
    return None

  def checksummed(self, step: int) -> bool:
    return (self.path(step) / MANIFEST).exists()

  def flags(self, step: int) -> dict | None:
    """The flags the run that saved `step` was started with (None if not stored)."""
    try:
      custom = self._manager.metadata(step).custom_metadata or {}
    except Exception:  # noqa: BLE001 - verify() reports the damage
      return None
    return custom.get("flags")

  def array_metadata(self, step: int) -> Any:
    """The saved train state's tree of array metadata (shapes, dtypes) at `step`."""
    metadata = self._manager.item_metadata(step)
    if metadata is None:
      raise FileNotFoundError(f"no item metadata in {self.path(step)}")
    return metadata

  def mismatch(self, step: int, abstract_state: Any) -> str | None:
    """How the saved train state's arrays differ from `abstract_state`'s (None: alike)."""
    def table(tree):
      flat = jax.tree_util.tree_flatten_with_path(tree)[0]
      return {jax.tree_util.keystr(p, simple=True, separator="/"):
              (tuple(x.shape), str(jax.numpy.dtype(x.dtype))) for p, x in flat}
    saved, wanted = table(self.array_metadata(step)), table(abstract_state)
    for name in sorted(set(saved) | set(wanted)):
      a, b = saved.get(name), wanted.get(name)
      if a != b:
        show = lambda v: "absent" if v is None else f"{v[1]}{list(v[0])}"
        return f"{name} is {show(a)} in the checkpoint but {show(b)} in this run"
    return None

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: the latest) with the shapes, dtypes and shardings of
    `abstract_state` (a tree of `jax.ShapeDtypeStruct`)."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def quarantine(self, step: int) -> epath.Path:
    """Moves damaged `step` to `damaged/` (beside earlier ones); returns where."""
    self._sync("quarantine")  # every process picks the same name, before the move
    dest = self.directory / DAMAGED / str(step)
    n = 1
    while dest.exists():
      n += 1
      dest = self.directory / DAMAGED / f"{step}.{n}"
    if self.lead:
      dest.parent.mkdir(parents=True, exist_ok=True)
      self.path(step).rename(dest)
    self._sync("quarantined")  # then all list the same steps (an Orbax delete waits
    self._manager.reload()  # for every process to delete the same step)
    return dest

  def _sync(self, name: str) -> None:
    """Waits until every process gets here (returns at once in a single process)."""
    self._syncs += 1
    ocp.multihost.sync_global_processes(f"Checkpointer:{name}:{self._syncs}")

  def newest_intact(self, say=print, below: int | None = None) -> int | None:
    """The newest intact step (below `below`, if given); each newer damaged one is moved
    to `damaged/` with one line saying which and why."""
    for step in reversed(self.steps()):
      if below is not None and step >= below:
        continue
      why = self.verify(step)
      if why is None:
        self.confirm(step)  # the earlier steps led to it: confirmed (itself: not yet)
        return step
      dest = self.quarantine(step)
      say(f"checkpoint step {step} in {self.directory} is damaged ({why}); moved it to "
          f"{dest} and fell back to the previous step")
    return None

  # resuming

  def resume_step(self, flags: dict, say=print, below: int | None = None) -> int | None:
    """The newest intact step (below `below`) whose stored flags fit `flags` (this run's,
    `validate.flags_of`); None if there is no step at all. A changed flag that shapes the
    train state raises `ResumeError` naming it; other changes are said in one line."""
    had = self.steps()
    step = self.newest_intact(say, below)
    if step is None:
      if had:
        raise ResumeError(
            f"--ckpt-dir: no intact checkpoint left in {self.directory} (damaged ones were "
            f"moved to {self.directory / DAMAGED}); use another --ckpt-dir to "
            "start afresh")
      return None
    saved = self.flags(step)
    if saved is None:
      say(f"checkpoint step {step} stores no flags (an older trainer): not compared")
      return step
    error, changes = validate.resume_changes(saved, flags)
    if error:
      raise ResumeError(error)
    if changes:
      say(f"resuming step {step} with changed flags: {'; '.join(changes)}")
    if not self.checksummed(step):
      say(f"checkpoint step {step} has no {MANIFEST} (written before checksums, or killed "
          "before they were): restoring it unverified")
    return step

  def restore_fitting(self, abstract_state: dict, step: int, flags: dict, say=print, *,
                      health=None):
    """(state, step): `step` restored, or the newest intact step before it if `step`
    cannot be read (moved to `damaged/` with one line). A train state that does not fit
    `abstract_state` raises `ResumeError` naming the first differing array; one without
    `health` (an older trainer's) gets `health()`."""
    bare = {k: v for k, v in abstract_state.items() if k != "health"}
    while True:
      try:
        why = self.mismatch(step, abstract_state)
        if why is None:
          return self.restore(abstract_state, step), step
        if health is not None and self.mismatch(step, bare) is None:
          say(f"checkpoint step {step} has no health counters (an older trainer): they "
              "start afresh")
          return {**self.restore(bare, step), "health": health()}, step
      except Exception as e:  # noqa: BLE001 - unreadable: damaged
        dest = self.quarantine(step)
        say(f"checkpoint step {step} in {self.directory} cannot be restored "
            f"({_first_line(e)}); moved it to {dest} and fell back to the previous step")
        step = self.resume_step(flags, say, below=step)
        if step is None:
          raise ResumeError(f"--ckpt-dir: no intact checkpoint left in {self.directory}")
        continue
      _, changes = validate.resume_changes(self.flags(step) or {}, flags)
      raise ResumeError(f"--ckpt-dir: the train state of step {step} does not fit this run "
                        f"({why}); flags changed since: {'; '.join(changes) or 'none'}")

  # writing

  def confirm(self, step: int) -> None:
    """Train step `step` ran finite, so every checkpoint before it (whose state it, or a
    step before it, started from) is confirmed healthy."""
    self._finite = step if self._finite is None else max(self._finite, step)

  def newest_confirmed(self) -> int | None:
    before = [s for s in self.steps() if self._finite is not None and s < self._finite]
    return max(before) if before else None

  def save(self, step: int, state: Any, flags: dict | None = None) -> bool:
    """Starts saving `state` as `step` (after finishing the previous save); False if the
    step exists. Raises `SaveError` (for this save, or else for the previous one, after
    this one has started), the earlier steps left in place."""
    earlier = None
    try:
      self.finish()
    except SaveError as e:
      earlier = e
    if step in self._manager.all_steps():
      if earlier:
        raise earlier
      return False
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True,
                         custom_metadata={"flags": flags} if flags else None)
    except Exception as e:  # noqa: BLE001 - OSError(ENOSPC), tensorstore errors, ...
      self._discard(step)
      message = self._failed(step, e)
      raise SaveError(f"{earlier}; {message}" if earlier else message, step) from e
    self._pending = step
    if earlier:
      raise earlier
    return True

  def finish(self) -> None:
    """Waits for the pending save, writes its `SHA256SUMS`, then deletes old steps."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
      why = self.verify(step)
      if why is not None:
        raise OSError(why)
      if self.lead:
        self._write_manifest(step)
    except Exception as e:  # noqa: BLE001
      self._discard(step)
      raise SaveError(self._failed(step, e), step) from e
    self._rotate()

  def _write_manifest(self, step: int) -> None:
    """Writes `SHA256SUMS`: locally to a synced temporary file renamed into place; to an
    object store directly (an object appears whole or not at all)."""
    root = self.path(step)
    text = "".join(f"{_sha256(root / name)}  {name}\n" for name in _files(root))
    if paths.is_remote(root):
      (root / MANIFEST).write_text(text)
      return
    tmp = root / (MANIFEST + ".tmp")
    try:
      with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, root / MANIFEST)
    finally:
      if tmp.exists():
        tmp.unlink()

  def _rotate(self) -> None:
    steps = self.steps()
    keep = set(steps[-self.keep:]) | {self.newest_confirmed()}
    for step in steps:
      if step not in keep:
        self._manager.delete(step)

  def _discard(self, step: int) -> None:
    """Removes what a failed save of `step` left (Orbax's temporary directories)."""
    self._manager.reload()
    if self.lead:
      for path in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        _remove(path)
      if step not in self._manager.all_steps() or not self.checksummed(step):
        _remove(self.path(step))
    self._manager.reload()

  def _failed(self, step: int, error: BaseException) -> str:
    kept = ", ".join(map(str, self.steps())) or "none"
    return (f"checkpoint step {step} not saved ({_first_line(error)}); the earlier ones "
            f"are intact (steps: {kept} in {self.directory})")

  def wait(self) -> None:
    self.finish()

  def close(self) -> None:
    try:
      self.finish()
    finally:
      self._manager.close()

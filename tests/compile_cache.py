"""A persistent XLA compilation cache in a directory, for tests that run the trainer twice.

The resumed run reads the first run's programs from the cache instead of compiling them
again; afterwards the previous settings come back and the cache object bound to the
directory is forgotten.
"""

import contextlib

import jax

_NAMES = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def compilation_cache(directory):
  """Caches every compiled program in ``directory`` while the context is open."""
  saved = {name: getattr(jax.config, name) for name in _NAMES}
  for name, value in zip(_NAMES, (str(directory), 0.0, 0)):
    jax.config.update(name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    try:  # forget the cache object bound to this directory
      from jax._src import compilation_cache as cc  # pylint: disable=g-import-not-at-top
      cc.reset_cache()
    except (ImportError, AttributeError):
      pass

"""Files written whole: a reader (another process, a restarted run) never sees half of one."""

import contextlib
import os


@contextlib.contextmanager
def written_whole(path: str, mode: str = 'w'):
  """Opens a temporary file beside `path` for writing, then renames it to `path` (atomic)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp_path = f'{path}.{os.getpid()}.tmp'
  with open(tmp_path, mode) as f:
    yield f
  os.replace(tmp_path, path)

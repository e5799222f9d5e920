"""A multi-process run whose process dies stops everywhere, in bounded time, naming the lost one.

Without this, the survivors of a `kill -9` wait in their next collective until JAX's coordination
service misses the dead process's heartbeats, then abort with a C++ stack dump that does not say
which process was lost. Here every process runs a watchdog thread that bumps a counter of its own
in the coordination service's key-value store each `interval` seconds and reads the others'. A
peer whose counter has not moved for `timeout` seconds (or a coordination service that has not
answered for that long: process 0, which hosts it, is gone) ends this process with one line,

  error: Lost process 1 of 2 (host-b, pid 4242): no heartbeat for 60 s. Stopping; rerun every
  process with the same command to resume from the last checkpoint.

and exit status 1. Counters rather than timestamps: hosts' clocks need not agree. JAX's own
heartbeat timeout is set longer (`jax_heartbeat_timeout`), so that this line comes first. A
survivor whose collective fails first (on CPU, gloo's connection to the dead process is reset)
calls `wait_for_lost_process()` before raising, so that the watchdog names the cause; a process
that exits keeps watching while it waits in JAX's shutdown barrier for the others.
"""

import atexit
import os
import socket
import sys
import threading
import time

from jax._src import distributed

_PREFIX = 'gpt_jax/alive/'
_DONE = 'done'
_watching = {}  # while the watchdog runs: its 'timeout' and 'interval'
_ended = threading.Event()  # this process is exiting: its counter says 'done'


def jax_heartbeat_timeout(timeout: float) -> int:
  """The `heartbeat_timeout_seconds` for jax.distributed.initialize: past the watchdog's."""
  return int(2 * timeout) + 10


def watch(timeout: float, interval: float = 1.0) -> threading.Thread | None:
  """Starts the watchdog (a daemon thread) of this process; None in a single-process run."""
  client = distributed.global_state.client
  count, me = distributed.global_state.num_processes, distributed.global_state.process_id
  if client is None or count <= 1:
    return None
  client.key_value_set(f'{_PREFIX}{me}/name', f'{socket.gethostname()}, pid {os.getpid()}',
                       allow_overwrite=True)
  thread = threading.Thread(target=_loop, args=(client, me, count, timeout, interval),
                            name='liveness', daemon=True)
  thread.start()
  atexit.register(_finished, client, me)  # runs before JAX's own exit handler shuts the client
  _watching.update(timeout=timeout, interval=interval)
  return thread


def wait_for_lost_process() -> None:
  """For an error that a lost process may have caused (a collective whose connection to it was
  reset): waits until the watchdog would have named a lost process, which ends this process
  with its one line; returns at once in a single-process run, or when no process is lost."""
  if _watching:
    time.sleep(_watching['timeout'] + 3 * _watching['interval'])


def _finished(client, me: int) -> None:
  """A process that ends (and waits in JAX's shutdown barrier for the others) is not lost to the
  others; it goes on watching them, so that a peer lost meanwhile is still named."""
  _ended.set()
  try:
    client.key_value_set(f'{_PREFIX}{me}/beat', _DONE, allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except
    pass


def _loop(client, me: int, count: int, timeout: float, interval: float) -> None:
  beats, last_seen = 0, {}  # peer -> (its counter, when it last moved, by this host's clock)
  last_answer = time.monotonic()
  while True:
    beats += 1
    now = time.monotonic()
    try:
      if not _ended.is_set():
        client.key_value_set(f'{_PREFIX}{me}/beat', str(beats), allow_overwrite=True)
      values = dict(client.key_value_dir_get(_PREFIX))
      last_answer = now
    except Exception:  # pylint: disable=broad-except  (the service is unreachable)
      if now - last_answer > timeout:
        _stop(0, count, 'the coordination service it hosts has not answered', now - last_answer,
              None)
      time.sleep(interval)
      continue
    for peer in range(count):
      if peer == me:
        continue
      beat = values.get(f'{_PREFIX}{peer}/beat')
      previous = last_seen.get(peer)
      if beat == _DONE or previous is None or beat != previous[0]:
        last_seen[peer] = (beat, now)
      elif now - previous[1] > timeout:
        _stop(peer, count, 'no heartbeat', now - previous[1],
              values.get(f'{_PREFIX}{peer}/name'))
    time.sleep(interval)


def _stop(peer: int, count: int, why: str, seconds: float, name: str | None) -> None:
  where = f' ({name})' if name else ''
  print(f'\nerror: Lost process {peer} of {count}{where}: {why} for {seconds:.0f} s. Stopping; '
        'rerun every process with the same command to resume from the last checkpoint.',
        file=sys.stderr, flush=True)
  os._exit(1)  # the main thread may be blocked in a collective that will never complete

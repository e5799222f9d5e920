"""A multi-process run whose process dies stops everywhere, in bounded time, naming the lost one.

Without this, the survivors of a `kill -9` wait in their next collective until JAX's coordination
service misses the dead process's heartbeats, then abort with a C++ stack dump that does not say
which process was lost. Here every process runs a watchdog thread that bumps a counter of its own
in the coordination service's key-value store each `interval` seconds and reads the others'. A
peer whose counter has not moved for `timeout` seconds (or a coordination service that has not
answered for that long: the machine that hosts it is gone) ends this process with one line,

  error: Lost process 1 of 2 (host-b, pid 4242): no heartbeat for 60 s. Stopping; rerun every
  process with the same command to resume from the last checkpoint.

and exit status 1. Counters rather than timestamps: hosts' clocks need not agree. JAX's own
heartbeat timeout is set longer (`jax_heartbeat_timeout`), so that this line comes first. A
survivor whose collective fails first (on CPU, gloo's connection to the dead process is reset)
calls `wait_for_lost_process()` before raising, so that the watchdog names the cause; a process
that exits keeps watching while it waits in JAX's shutdown barrier for the others.

Process 0 is special: JAX hosts the coordination service inside it, and every other process
aborts with a C++ stack dump the moment that service's connection drops (the client's
`missed_heartbeat_callback` cannot be a Python function: jaxlib cannot pass its argument, an
absl::Status, to Python, and terminates). So `initialize` runs the service in a small process
of its own, started by process 0, that outlives a killed process 0 by the watchdog's timeout:
the others' watchdogs then see process 0's counter stop, like any other process's, and name it.
A whole lost machine 0 takes the service with it; then JAX's own abort is what the others print.
"""

import atexit
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.extend.backend
from jax._src import clusters, distributed

from gpt_jax.errors import ConfigError

_PREFIX = 'gpt_jax/alive/'
_DONE = 'done'
_watching = {}  # while the watchdog runs: its 'timeout' and 'interval'
_ended = threading.Event()  # this process is exiting: its counter says 'done'


def jax_heartbeat_timeout(timeout: float) -> int:
  """The `heartbeat_timeout_seconds` for jax.distributed.initialize: past the watchdog's."""
  return int(2 * timeout) + 10


def initialize(timeout: float, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
  """jax.distributed.initialize (what it leaves unset, it detects from the cluster as JAX does),
  with the coordination service in a process of its own; `timeout` is the watchdog's."""
  local_device_ids = None
  if None in (coordinator_address, num_processes, process_id):
    coordinator_address, num_processes, process_id, local_device_ids = (
        clusters.ClusterEnv.auto_detect_unset_distributed_params(
            coordinator_address, num_processes, process_id, None, None, 300))
  bind_address = None
  if process_id == 0 and coordinator_address and num_processes:
    _start_service(coordinator_address, num_processes, timeout)
    bind_address = '127.0.0.1:0'  # the service JAX starts in process 0 anyway: nobody uses it
  jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                             coordinator_bind_address=bind_address,
                             heartbeat_timeout_seconds=jax_heartbeat_timeout(timeout))


def _start_service(coordinator_address: str, num_processes: int, timeout: float) -> None:
  linger = timeout + 10  # past the moment the others' watchdogs name a killed process 0
  service = subprocess.Popen(
      [sys.executable, '-m', 'gpt_jax.coordination_service', coordinator_address,
       str(num_processes), str(jax_heartbeat_timeout(timeout)), str(linger)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  answer = service.stdout.readline().strip()
  if answer != 'ready':
    raise ConfigError(answer or f'The coordination service for {coordinator_address} did not '
                      f'start (exit status {service.wait()}).')

  def stop():  # after the others have passed JAX's shutdown barrier, which needs the service
    # JAX's own exit handler, which would run after this one, in its order: the backends' CPU
    # collectives use the distributed client, and abort if it goes first.
    jax.extend.backend.clear_backends()
    jax.distributed.shutdown()
    service.communicate('done\n')
  atexit.register(stop)  # before watch()'s: atexit runs the last registered first


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


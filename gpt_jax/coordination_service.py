"""JAX's coordination service in a process of its own, so that it outlives a killed process 0.

  python -m gpt_jax.coordination_service HOST:PORT NUM_PROCESSES HEARTBEAT_S LINGER_S

Started by gpt_jax.liveness.initialize in process 0, with a pipe on its stdin. It prints `ready`
once it listens, and serves until process 0 writes `done` (after JAX's shutdown barrier), or,
when the pipe closes without it (process 0 was killed), for LINGER_S seconds more: long enough
for the other processes' watchdogs to see process 0's heartbeats stop and name it. It imports
jaxlib alone, not jax, to start in a fraction of a second.
"""

import os
import signal
import socket
import sys
import time

from jaxlib import _jax


def serve(coordinator_address: str, num_processes: int, heartbeat: int, linger: float) -> None:
  for stop_signal in (signal.SIGINT, signal.SIGTERM):  # those go to process 0, which needs us
    signal.signal(stop_signal, signal.SIG_IGN)
  host, port = coordinator_address.rsplit(':', 1)
  # gRPC binds with SO_REUSEPORT: a second service on the port would share its connections.
  # The one that a killed run left behind ends within `linger` seconds; wait for it.
  deadline = time.monotonic() + linger + 5
  while _answers(host.strip('[]'), int(port)):
    if time.monotonic() > deadline:
      print(f'Port {port} of {host} is in use: choose another --coordinator_address.',
            flush=True)
      return
    time.sleep(0.5)
  service = _jax.get_distributed_runtime_service(
      os.environ.get('JAX_COORDINATOR_BIND_ADDRESS', f'[::]:{port}'), num_processes,
      heartbeat_timeout=heartbeat)
  print('ready', flush=True)
  if sys.stdin.readline() != 'done\n':
    devnull = os.open(os.devnull, os.O_WRONLY)  # let go of process 0's output pipes
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    time.sleep(linger)
  service.shutdown()


def _answers(host: str, port: int) -> bool:
  """Whether something listens at host:port."""
  with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as probe:
    probe.settimeout(1)
    return probe.connect_ex((host, port)) == 0


if __name__ == '__main__':
  serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))

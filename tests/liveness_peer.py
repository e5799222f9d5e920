"""One process of a 2-process jax.distributed group on 127.0.0.1 with gpt_jax.liveness watching.

  python tests/liveness_peer.py PORT PROCESS_ID TIMEOUT_S {wait,exit}

Prints `ready` once both processes are connected and watched, then waits (to be killed, or for
its peer to be) or exits normally after a few seconds. Run by tests/test_reliability.py.
"""

import sys
import time

from gpt_jax import liveness

port, process_id, timeout, then = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
liveness.initialize(timeout, f'127.0.0.1:{port}', 2, process_id)
liveness.watch(timeout, interval=0.2)
print('ready', flush=True)
time.sleep(60 if then == 'wait' else 0.5)

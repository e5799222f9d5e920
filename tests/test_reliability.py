"""Never lose a run: kills, signals, corrupted checkpoints, non-finite steps, bad input."""

import glob
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import jax
import pytest

from conftest import REPO, module_env, read_metrics, run_module, train, train_args
from gpt_jax import checkpoint, cli
from gpt_jax import config as config_lib

# Dropout on: the resumed run must also reproduce the per-step randomness.
RUN = {'train.num_steps': 16, 'train.log_every': 1, 'train.eval_every': 0,
       'checkpoint.every_steps': 4, 'optim.warmup_steps': 2, 'model.dropout': 0.1}


def start_train(workdir, tfds_dir, **overrides) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, '-m', 'gpt_jax.train', *train_args(workdir, tfds_dir, **overrides)],
      cwd=REPO, env=module_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(workdir) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  return max(read_metrics(workdir, 'train_loss'), default=0) if os.path.exists(path) else 0


def saving_in_progress(workdir) -> bool:
  """Orbax writes a step into a temporary directory and renames it when complete."""
  return any('tmp' in name for name in os.listdir(os.path.join(workdir, 'checkpoints'))
             if os.path.isdir(os.path.join(workdir, 'checkpoints')))


def wait_for(proc, condition, timeout=120):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f'exited early:\n{proc.communicate()[1][-3000:]}'
    assert time.time() < deadline, 'timed out'
    time.sleep(0.002)


def params_of(workdir):
  return checkpoint.load_model(workdir)[1]


def assert_same_run(workdir, reference):
  assert read_metrics(workdir, 'train_loss') == read_metrics(reference, 'train_loss')
  for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(params_of(reference)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope='module')
def straight(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  train(workdir, tfds_dir, **RUN)
  return workdir


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, tfds_dir, straight):
  workdir = str(tmp_path / 'killed')
  kill_points = [lambda: logged_steps(workdir) >= 3,
                 lambda: logged_steps(workdir) >= 6 and saving_in_progress(workdir)]
  for condition in kill_points:
    proc = start_train(workdir, tfds_dir, **RUN)
    wait_for(proc, condition)
    proc.kill()
    proc.wait()
  train(workdir, tfds_dir, **RUN)
  assert_same_run(workdir, straight)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, tfds_dir, straight):
  workdir = str(tmp_path / 'terminated')
  proc = start_train(workdir, tfds_dir, **RUN)
  wait_for(proc, lambda: logged_steps(workdir) >= 5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  stopped = int(out.split('Stopped at step ')[1].split()[0])
  assert 5 <= stopped < 16 and 'on SIGTERM' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(stopped)))
  train(workdir, tfds_dir, **RUN)
  assert_same_run(workdir, straight)


def test_second_sigint_aborts_at_once():
  from gpt_jax.train import StopRequest
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
  stop = StopRequest()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal_name == 'SIGINT'  # the first asks for a checkpoint and a clean stop
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is before


def corrupt_latest(workdir) -> str:
  """Flips bytes in the middle of the latest checkpoint's largest parameter file."""
  step_dir = os.path.join(workdir, 'checkpoints', str(checkpoint.make_manager(
      workdir, read_only=True).latest_step()))
  files = glob.glob(os.path.join(step_dir, 'params', '**', 'd', '*'), recursive=True)
  target = max(files, key=os.path.getsize)
  with open(target, 'r+b') as f:
    f.seek(os.path.getsize(target) // 2)
    f.write(b'\xde\xad\xbe\xef' * 4)
  return step_dir


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path, tfds_dir, straight):
  workdir = str(tmp_path / 'corrupted')
  train(workdir, tfds_dir, **RUN)
  bad = corrupt_latest(workdir)
  proc = run_module('gpt_jax.sample', f'--workdir={workdir}', '--max_new_tokens=5', check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: {bad}: 1 arrays differ from what was saved (first: '
      f"{proc.stderr.split('(first: ')[1].split(')')[0]})")
  # Training falls back to step 12, says so, and redoes steps 13-16 exactly.
  proc = train(workdir, tfds_dir, **RUN)
  assert f'{bad}: 1 arrays differ' in proc.stderr and 'Resuming from step 12' in proc.stderr
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', '16'))
  assert_same_run(workdir, straight)


def test_fingerprint_on_host_equals_the_device_program():
  # A checkpoint written on several devices (the device program) is verified on one CPU device
  # (numpy), and the other way round: both must give the same checksums, wrapping alike.
  rng = np.random.default_rng(0)
  tree = {'f32': rng.standard_normal((300, 7)).astype(np.float32), 'i32': np.int32(-7),
          'bf16': rng.standard_normal((5, 33)).astype(jax.numpy.bfloat16),
          'ints': rng.integers(-2**31, 2**31, 4099).astype(np.int32)}
  on_device = jax.device_get(checkpoint._checksum_all(tree))
  for name, x in tree.items():
    np.testing.assert_array_equal(checkpoint.checksum_on_host(x), on_device[name], name)


def test_unreadable_checkpoints_never_restart_silently(tmp_path, tfds_dir):
  workdir = str(tmp_path / 'all_bad')
  train(workdir, tfds_dir, **{**RUN, 'train.num_steps': 4})
  corrupt_latest(workdir)
  proc = train(workdir, tfds_dir, check=False, **RUN)
  last_line = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode != 0 and '--start_over' in last_line and 'steps [4]' in last_line
  train(workdir, tfds_dir, extra_flags=['--start_over'], **{**RUN, 'train.num_steps': 2})
  assert sorted(read_metrics(workdir, 'train_loss')) == [1, 2]


def test_incompatible_model_config_is_named(tmp_path, tfds_dir):
  workdir = str(tmp_path / 'run')
  train(workdir, tfds_dir, **{**RUN, 'train.num_steps': 4})
  proc = train(workdir, tfds_dir, check=False, **{**RUN, 'model.emb_dim': 32,
                                                  'model.num_layers': 3})
  last_line = proc.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: The checkpoints in') and 'Traceback' not in proc.stderr
  assert 'model.num_layers=2 there, 3 here' in last_line and 'model.emb_dim=64 there' in last_line


@pytest.mark.parametrize('mode', ['halt', 'skip'])
def test_nonfinite_steps_halt_or_skip_and_never_reach_a_checkpoint(tmp_path, tfds_dir, mode):
  workdir = str(tmp_path / mode)
  # An absurd learning rate: the first update sends activations to inf, the loss to NaN.
  proc = train(workdir, tfds_dir, check=False, **{
      **RUN, 'train.num_steps': 6, 'optim.lr': 1e30, 'optim.warmup_steps': 0,
      'optim.grad_clip': 0, 'train.on_nonfinite': mode})
  if mode == 'halt':
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        'error: Non-finite loss or gradient at step 2')
  else:
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(workdir, 'skipped_steps')[6] == 5
    params = params_of(workdir)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_bad_inputs_give_one_line_errors(tmp_path, tfds_dir):
  def error_of(**overrides):
    workdir = tmp_path / f'run{len(list(tmp_path.iterdir()))}'
    proc = train(str(workdir), tfds_dir, check=False, devices=8, **overrides)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith('error: ')
    return last_line

  assert 'dimension 4 does not divide over mesh axes' in error_of(
      **{'mesh.tensor': 8, 'mesh.data': 1})
  assert 'does not divide over data x fsdp = 4' in error_of(
      **{'data.batch_size': 6, 'mesh.data': 4, 'mesh.tensor': 2})
  assert 'data.eval_batch_size (6) does not divide over data x fsdp = 4' in error_of(
      **{'data.eval_batch_size': 6, 'mesh.data': 4, 'mesh.tensor': 2})
  empty, latin1, tiny = tmp_path / 'empty.txt', tmp_path / 'latin1.txt', tmp_path / 'tiny.txt'
  empty.write_text('')
  latin1.write_bytes('caf\xe9 au lait\n'.encode('latin-1') * 100)
  tiny.write_text('a small corpus\n' * 40)
  assert 'is empty' in error_of(**{'data.text_files': str(empty), 'data.tfds_name': ''})
  assert f'{latin1} is not UTF-8 text' in error_of(
      **{'data.text_files': str(latin1), 'data.tfds_name': ''})
  assert 'sentencepiece training with data.vocab_size=512 failed' in error_of(
      **{'data.text_files': str(tiny), 'data.tfds_name': ''})


FLAG_MISTAKES = [  # (binary, arguments, the one line it prints)
    ('gpt_jax.train', ['--config=configs/default.py', '--workdir=W', '--config.trian.num_steps=1'],
     'error: config.trian is not a field of configs/default.py (did you mean '
     'config.train.num_steps?)'),
    ('gpt_jax.train', ['--config=configs/default.py', '--workdir=W',
                       '--config.train.num_steps=abc'],
     "error: config.train.num_steps takes an integer, got 'abc'"),
    ('gpt_jax.finetune', ['--config=configs/sft.py', '--init_from=B', '--workdir=W',
                          '--config.lora.rnak=8'],
     'error: config.lora.rnak is not a field of configs/sft.py (did you mean config.lora.rank?)'),
    ('gpt_jax.aot', ['--config=configs/default.py', '--topolgy=v5p-8'],
     'error: unknown flag --topolgy (did you mean --topology?)'),
    ('gpt_jax.sweep', ['--sweep=experiments/scaling/sweep.py', '--root=R', '--dry_run',
                       '--config.optim.lrr=1'],
     'error: config.optim.lrr is not a field of experiments/scaling/config.py (did you mean '
     'config.optim.lr?)'),
    ('gpt_jax.sweep', ['--sweep=experiments/scaling/sweep.py', '--rot=R'],
     'error: unknown flag --rot (did you mean --root?)'),
]


@pytest.mark.parametrize('binary,args,line', FLAG_MISTAKES,
                         ids=[f'{b[8:]}:{a[-1]}' for b, a, _ in FLAG_MISTAKES])
def test_flag_and_config_field_mistakes_are_one_line_naming_the_closest(binary, args, line):
  """Before anything compiles: every binary that takes a config, and the others' flags."""
  proc = run_module(binary, *args, check=False, timeout=60)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [line]


def test_field_errors_name_the_closest_path():
  config = config_lib.base_config()
  assert cli.field_error(config, 'train.num_steps') is None
  assert cli.field_error(config, 'num_steps') == (
      'config.num_steps is not a field of the config (did you mean config.train.num_steps?)')
  assert cli.field_error(config, 'modle.num_layer') == (
      'config.modle is not a field of the config (did you mean config.model.num_layers?)')
  assert cli.field_error(config, 'model.num_layers.x') == (
      'config.model.num_layers is a value, not a group of fields')
  assert cli.field_error(config, 'zzz') == 'config.zzz is not a field of the config'


def test_a_lost_process_stops_the_other_in_bounded_time_naming_it(tmp_path):
  """2 processes under jax.distributed on 127.0.0.1: `kill -9` of either one (process 0
  included, whose process started the coordination service) stops the other within about the
  heartbeat timeout (2 s here), with one line naming the lost one; a process that ends normally
  is not lost while it waits for its peer, and still names its peer if that one is lost."""
  def start(port, process_id, then):
    return subprocess.Popen(
        [sys.executable, 'tests/liveness_peer.py', str(port), str(process_id), '2', then],
        cwd=REPO, env=module_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def assert_named_in_time(survivor, lost, lost_process, kill_time):
    _, err = survivor.communicate(timeout=30)
    seconds = time.perf_counter() - kill_time
    # Counted from the lost process's last heartbeat that the survivor saw (which, on a loaded
    # machine, may be before the kill): the line comes about 2 s after it.
    assert survivor.returncode == 1 and seconds < 10, (lost_process, seconds, err[-3000:])
    assert re.fullmatch(
        rf'error: Lost process {lost_process} of 2 \(.+, pid {lost.pid}\): no heartbeat for '
        r'[23] s\. Stopping; rerun every process with the same command to resume from the last '
        r'checkpoint\.', err.strip().splitlines()[-1]), err[-3000:]

  ports = []
  for _ in range(2):
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      ports.append(s.getsockname()[1])
  killed = [start(ports[0], 0, 'wait'), start(ports[0], 1, 'wait')]
  finishing = [start(ports[1], 0, 'wait'), start(ports[1], 1, 'exit')]
  for proc in killed + finishing:
    assert proc.stdout.readline() == 'ready\n', proc.communicate()[1][-3000:]
  killed[1].kill()
  assert_named_in_time(killed[0], killed[1], 1, time.perf_counter())
  # By now process 1 of the other pair has ended its script and waits in JAX's shutdown barrier
  # for process 0: neither counts the other as lost.
  assert finishing[0].poll() is None and finishing[1].poll() is None, \
      finishing[1].communicate()[1][-3000:]
  finishing[0].kill()
  assert_named_in_time(finishing[1], finishing[0], 0, time.perf_counter())
  for proc in killed + finishing:
    proc.kill()
    proc.wait()


def test_disk_full_at_checkpoint_time_stops_cleanly(tmp_path, tfds_dir):
  """A 3 MB filesystem holds one checkpoint of this model but not two."""
  if subprocess.run(['unshare', '-rm', 'true'], capture_output=True).returncode != 0:
    pytest.skip('needs unshare (user and mount namespaces) to mount a small tmpfs')
  small = tmp_path / 'small'
  small.mkdir()
  workdir = small / 'run'
  args = train_args(str(workdir), tfds_dir, **{
      **RUN, 'train.num_steps': 12, 'train.compilation_cache': False,
      'data.cache_dir': str(tmp_path / 'cache')})
  restore = (f'from gpt_jax import checkpoint; '
             f'print("restored step", checkpoint.load_model("{workdir}")[2])')
  script = (f'mount -t tmpfs -o size=3m tmpfs {small} && '
            f'{sys.executable} -m gpt_jax.train {" ".join(args)}; echo "exit code $?"; '
            f"{sys.executable} -c '{restore}'")
  proc = subprocess.run(['unshare', '-rm', 'sh', '-c', script], cwd=REPO, env=module_env(),
                        capture_output=True, text=True, timeout=300)
  error = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  # The same message whichever write meets the full disk first (a tensorstore array or a
  # Python-written metadata file: it varies from run to run).
  assert error == [f'error: Writing a checkpoint to {workdir}/checkpoints failed: No space left '
                   'on device. The newest complete checkpoint is step 4.'], proc.stderr[-3000:]
  assert 'exit code 1' in proc.stdout and 'restored step 4' in proc.stdout, proc.stdout


def test_full_disk_while_writing_metrics_is_a_clear_error_and_does_not_hide_the_first(tmp_path):
  from gpt_jax.metrics import MetricWriter, MetricsWriteError
  from gpt_jax.train import close_all
  workdir = tmp_path / 'run'
  writer = MetricWriter(str(workdir), tensorboard=False)
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (16, limits[1]))  # files stop growing at 16 bytes
  try:
    with pytest.raises(MetricsWriteError, match=f'Writing metrics to {workdir} failed: File too'):
      writer.write(1, {'train_loss': 1.0})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)

  def failing_close():
    raise OSError(28, 'No space left on device')

  closed = []
  with pytest.raises(checkpoint.CheckpointWriteError, match='the first error'):
    try:
      raise checkpoint.CheckpointWriteError('the first error')
    finally:
      close_all(failing_close, lambda: closed.append(True))
  assert closed == [True]  # the closers after the failing one still ran
  with pytest.raises(OSError, match='No space left'):
    close_all(failing_close)  # with no error in flight, a closer's failure is raised

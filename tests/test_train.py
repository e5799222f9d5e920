"""The real train and sample binaries, run as a user runs them (in subprocesses)."""

import collections
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import jax

from conftest import REPO, module_env, read_metrics, run_module, train, train_args
from gpt_jax import checkpoint, data


def restore_params(workdir):
  return checkpoint.load_model(workdir)[1]


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loss_decreases_on_builtin_corpus_then_sample(tmp_path, tfds_dir):
  workdir = str(tmp_path / 'run')
  train(workdir, tfds_dir, **{'train.num_steps': 100, 'train.log_every': 20,
                              'train.eval_every': 50, 'optim.warmup_steps': 10,
                              'model.num_layers': 3},  # an override that must reach the model
        compile_cache=False)  # the default cache, <workdir>/jax_cache, checked below
  losses = read_metrics(workdir, 'train_loss')
  val = read_metrics(workdir, 'val_loss')
  assert sorted(losses) == [20, 40, 60, 80, 100] and sorted(val) == [50, 100]
  assert losses[100] < losses[20] - 0.4 and losses[100] < np.log(512) - 1.5, losses
  unigram_entropy = read_metrics(workdir, 'val_unigram_entropy')[0]
  assert val[100] < val[50] and val[100] < unigram_entropy - 0.3, (val, unigram_entropy)
  for name in ('config.json', 'tokenizer/tokenizer.json', 'checkpoints/100', 'tensorboard'):
    assert os.path.exists(os.path.join(workdir, name)), name
  # The compiled train step is in the persistent cache, for the next restart.
  assert any(f.startswith('jit_train_step') for f in os.listdir(os.path.join(workdir, 'jax_cache')))
  params = restore_params(workdir)
  assert sorted(k for k in params if k.startswith('block_')) == ['block_0', 'block_1', 'block_2']
  assert checkpoint.load_config(workdir).model.num_layers == 3

  sample = lambda *flags: run_module('gpt_jax.sample', f'--workdir={workdir}',
                                     '--prompt=The ', '--max_new_tokens=20', *flags).stdout
  greedy = sample('--temperature=0')
  assert greedy.startswith('The ') and len(greedy) > len('The \n')
  assert sample('--temperature=0') == greedy
  assert sample('--temperature=1', '--seed=3') == sample('--temperature=1', '--seed=3')

  # Fine-tuning from it starts where it ended, not from scratch.
  tuned = str(tmp_path / 'tuned')
  run_module('gpt_jax.train', f'--config=configs/finetune.py:{workdir}', f'--workdir={tuned}',
             f'--config.data.tfds_data_dir={tfds_dir}', '--config.train.num_steps=2',
             '--config.train.log_every=1', '--config.train.eval_every=0',
             '--config.train.measure_peak=False', '--config.train.sample_tokens=0',
             '--config.train.progress_bar=False')
  assert read_metrics(tuned, 'train_loss')[1] < losses[100] + 0.3
  assert checkpoint.load_config(tuned).model.num_layers == 3


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_resume_equals_uninterrupted_run(tmp_path, tfds_dir, optimizer):
  common = {'train.log_every': 1, 'train.eval_every': 0, 'checkpoint.every_steps': 4,
            'optim.decay_steps': 12, 'optim.warmup_steps': 2, 'model.dropout': 0.1,
            'optim.name': optimizer, 'data.cache_dir': str(tmp_path / 'cache')}
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train(straight, tfds_dir, **common, **{'train.num_steps': 12})
  train(resumed, tfds_dir, **common, **{'train.num_steps': 6})  # stops after step 6
  train(resumed, tfds_dir, **common, **{'train.num_steps': 12})  # resumes from step 6
  assert read_metrics(resumed, 'train_loss') == read_metrics(straight, 'train_loss')
  assert_trees_equal(restore_params(resumed), restore_params(straight))


def read_windows(workdir, steps, process_count, position=None):
  """The windows (token ids, inputs + last target) that `process_count` processes of the run in
  `workdir` read in `steps` steps from data position `position` (the start if None), and the
  position each process ends at."""
  config = checkpoint.load_config(workdir)
  tokenizer = data.prepare_tokenizer(config, workdir)
  windows, ends = [], []
  for process in range(process_count):
    batches = data.make_train_iterator(config, tokenizer, workdir, process, process_count)
    if position is not None:
      batches.set_state(position)
    for _ in range(steps):
      batch = next(batches)
      windows += [tuple(np.append(i, t[-1])) for i, t in zip(batch['inputs'], batch['targets'])]
    ends.append(batches.get_state())
  return windows, ends


def saved_data_positions(workdir, step):
  """{file name: data position} of the processes that wrote checkpoint `step`."""
  folder = os.path.join(workdir, 'checkpoints', str(step), 'data')
  positions = {}
  for name in sorted(n for n in os.listdir(folder) if n.endswith('.json')):
    with open(os.path.join(folder, name), encoding='utf-8') as f:
      positions[name] = json.load(f)
  return positions


def test_two_hosts_and_eight_devices_match_one_device(tmp_path, tfds_dir):
  """The same config on 1 device and on 2 processes of 4 devices each (jax.distributed over
  127.0.0.1, data x fsdp x tensor = 2x2x2): the same losses. The 2-process run then resumes in
  1 process of 8 devices (the same mesh): the state reshards, the data order goes on where it
  stopped, and the losses stay the 1-device run's. (Every mesh of 8 devices in one process,
  trained from the start, is tests/test_sharding.py's.)"""
  common = {'train.num_steps': 5, 'train.log_every': 1, 'train.eval_every': 5,
            'data.cache_dir': str(tmp_path / 'cache'), 'optim.warmup_steps': 1,
            'optim.decay_steps': 8}
  mesh = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  one, hosts = str(tmp_path / 'one'), str(tmp_path / 'hosts')
  # A few steps each, compiled alike and compared with each other: quick to compile.
  train(one, tfds_dir, quick_compile=True, **{**common, 'train.num_steps': 8})
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  args = train_args(hosts, tfds_dir, **common, **mesh)
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'gpt_jax.train', *args, f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}'], cwd=REPO,
      env=module_env(devices=4, quick_compile=True),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
  # Written by 2 processes x 4 devices at step 5, resumed by 1 process x 8 devices to step 8.
  train(hosts, tfds_dir, devices=8, quick_compile=True, **{**common, 'train.num_steps': 8},
        **mesh)
  for key in ('train_loss', 'grad_norm', 'val_loss'):
    expected, got = read_metrics(one, key), read_metrics(hosts, key)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [expected[s] for s in sorted(expected)], rtol=1e-5)
  # Written by 1 process x 8 devices, restored on 1 device: a resharding restore.
  for a, b in zip(jax.tree.leaves(restore_params(one)), jax.tree.leaves(restore_params(hosts))):
    # atol: Adam divides by sqrt(v), so float32 rounding in a near-zero gradient moves a
    # near-zero parameter by ~1e-6 however the devices split the sums.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  sample = run_module('gpt_jax.sample', f'--workdir={hosts}', '--prompt=The ',
                      '--max_new_tokens=8', '--temperature=0', devices=2, quick_compile=True)
  assert sample.stdout.startswith('The ')
  # The windows trained on: the 2 processes' positions at step 5 and the resumed process's at
  # step 8 are those of iterators that read steps 1-5 in 2 processes, then steps 6-8 in 1 from
  # the saved position; together those read the uninterrupted run's windows, each once.
  written, ends = read_windows(hosts, 5, process_count=2)
  assert saved_data_positions(hosts, 5) == {
      f'process_{p}-of-2.json': end for p, end in enumerate(ends)}
  resumed, ends = read_windows(hosts, 3, process_count=1, position=ends[0])
  assert saved_data_positions(hosts, 8) == {'process_0-of-1.json': ends[0]}
  uninterrupted, _ = read_windows(one, 8, process_count=1)
  assert len(uninterrupted) == 8 * 8 and len(set(uninterrupted)) == 8 * 8
  assert collections.Counter(written + resumed) == collections.Counter(uninterrupted)


def test_compilation_cache_in_jax_compilation_cache_dir_and_off_when_disabled(tmp_path, tfds_dir):
  cache = tmp_path / 'shared_cache'
  env = {**module_env(), 'JAX_COMPILATION_CACHE_DIR': str(cache)}
  # The disabled run's model differs, so that a cache left on would gain new entries.
  for name, enabled, layers in (('on', True, 2), ('off', False, 1)):
    workdir = tmp_path / name
    args = train_args(str(workdir), tfds_dir, **{'train.num_steps': 1, 'train.eval_every': 0,
                                                'train.compilation_cache': enabled,
                                                'model.num_layers': layers})
    subprocess.run([sys.executable, '-m', 'gpt_jax.train', *args], cwd=REPO, env=env,
                   check=True, capture_output=True)
    assert not (workdir / 'jax_cache').exists()
    entries = sorted(os.listdir(cache))
    if enabled:
      assert any(f.startswith('jit_train_step') for f in entries), entries
      cached = entries
  assert entries == cached  # the disabled run wrote nothing


def test_gradient_accumulation_matches_full_batch(tmp_path, tfds_dir):
  common = {'train.num_steps': 3, 'train.log_every': 1, 'train.eval_every': 0,
            'data.cache_dir': str(tmp_path / 'cache')}
  full, accumulated = str(tmp_path / 'full'), str(tmp_path / 'accumulated')
  train(full, tfds_dir, **common)
  train(accumulated, tfds_dir, **common, **{'optim.grad_accum_steps': 4})
  np.testing.assert_allclose(list(read_metrics(accumulated, 'train_loss').values()),
                             list(read_metrics(full, 'train_loss').values()), rtol=1e-5)


def test_bad_input_gives_one_line_errors(tmp_path, tfds_dir):
  workdir = str(tmp_path / 'run')
  proc = train(workdir, tfds_dir, check=False, **{'model.num_layerz': 2})
  assert proc.returncode != 0 and 'num_layerz' in proc.stderr
  proc = train(workdir, tfds_dir, check=False, **{'model.emb_dim': 30})
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith('error: config.model.emb_dim (30)')
  proc = train(workdir, tfds_dir, check=False, devices=8, **{'mesh.data': 3})
  assert 'error: config.mesh' in proc.stderr and 'Traceback' not in proc.stderr
  proc = train(workdir, tfds_dir, check=False, **{'data.text_files': str(tmp_path / 'no*.txt'),
                                                 'data.tfds_name': ''})
  assert proc.returncode != 0 and 'no*.txt' in proc.stderr and 'Traceback' not in proc.stderr
  proc = run_module('gpt_jax.sample', f'--workdir={tmp_path / "missing"}', check=False)
  assert proc.stderr.strip().splitlines()[-1].startswith('error: ') and 'missing' in proc.stderr


def test_bfloat16_compute_trains_like_float32(tmp_path, tfds_dir):
  common = {'train.num_steps': 60, 'train.log_every': 20, 'train.eval_every': 60,
            'optim.warmup_steps': 10, 'data.cache_dir': str(tmp_path / 'cache')}
  f32, bf16 = str(tmp_path / 'f32'), str(tmp_path / 'bf16')
  train(f32, tfds_dir, **common)
  train(bf16, tfds_dir, **common, **{'model.compute_dtype': 'bfloat16'})
  assert read_metrics(bf16, 'train_loss')[60] < read_metrics(bf16, 'train_loss')[20]
  assert abs(read_metrics(bf16, 'val_loss')[60] - read_metrics(f32, 'val_loss')[60]) < 0.05


def test_metrics_without_tensorboard_write_only_jsonl(tmp_path):
  from gpt_jax.metrics import MetricWriter
  for tensorboard in (True, False):
    workdir = tmp_path / str(tensorboard)
    writer = MetricWriter(str(workdir), tensorboard=tensorboard)
    writer.write(1, {'train_loss': 2.5})
    writer.close()
    assert read_metrics(str(workdir), 'train_loss') == {1: 2.5}
    assert (workdir / 'tensorboard').is_dir() == tensorboard


def test_tensorboard_events_hold_the_scalars_without_loading_torch(tmp_path):
  # A fresh process: torch (installed here) must not be imported by writing TensorBoard events.
  script = ('import sys; from gpt_jax.metrics import MetricWriter; '
            f'w = MetricWriter({str(tmp_path)!r}); '
            "w.write(1, {'train_loss': 2.5}); w.write(2, {'train_loss': 2.25}); w.close(); "
            "print('torch' in sys.modules)")
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=module_env(),
                        capture_output=True, text=True, check=True)
  assert proc.stdout.split() == ['False']
  from tensorboardX.proto import event_pb2
  [path] = (tmp_path / 'tensorboard').iterdir()
  data, scalars = path.read_bytes(), {}
  while data:  # TFRecord framing: length (8 bytes), its CRC (4), the Event, its CRC (4)
    length = int.from_bytes(data[:8], 'little')
    event = event_pb2.Event.FromString(data[12:12 + length])
    data = data[16 + length:]
    for value in event.summary.value:
      scalars[(event.step, value.tag)] = value.simple_value
  assert scalars == {(1, 'train_loss'): 2.5, (2, 'train_loss'): 2.25}

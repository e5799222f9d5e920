r"""What fits where: a sweep of `gpt_jax.aot` over configs and Cloud TPU slices, rendered as the
tables of this folder's README and of the project README.

  pip install -e '.[tpu]'
  python experiments/tpu_plan/plan.py                 # every row (about an hour on 2 CPU cores)
  python experiments/tpu_plan/plan.py --only=remat    # the rows whose name starts so
  python experiments/tpu_plan/plan.py --render        # the tables again from results.json

Each row runs `python -m gpt_jax.aot` in its own process and keeps its JSON report in
results.json; the tables are written between the `<!-- tpu_plan:NAME -->` markers of the
READMEs. MaxText's figures (commit e591f30, its own train_compile.py on the same shapes, bf16
compute over float32 weights and AdamW, scanned layers) are constants here: they cannot be
measured by this script.
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..', '..')
RESULTS = os.path.join(HERE, 'results.json')

# The 2-layer shape of a Llama-3-8B layer for weak scaling: one sequence of 4096 per chip.
WEAK = ['--config.model.num_layers=2', '--config.model.vocab_size=32000',
        '--config.data.vocab_size=32000', '--config.mesh.data=1', '--config.mesh.fsdp=-1']

# MaxText's GB per chip on the 1B shape (v5p-8, batch 16 x 4096): (attention, remat) -> GB.
MAXTEXT_1B = {('xla', 'full'): 14.41, ('xla', 'minimal'): 32.00, ('splash', 'full'): 7.70,
              ('splash', 'minimal'): 19.38}
# and on the weak-scaling shape: chips -> GB (dot-product attention).
MAXTEXT_WEAK = {16: 6.43, 64: 5.46}

# name: (table, config, topology, aot flags, MaxText's GB per chip or None)
ROWS = {
    'fit/gpt2_124m': ('fit', 'gpt2_124m', 'v5e-8', [], None),
    'fit/llama_1b': ('fit', 'llama_1b', 'v5p-8', ['--decode'], MAXTEXT_1B[('splash', 'full')]),
    'fit/llama_1b/max': ('fit', 'llama_1b', 'v5p-8', ['--max_batch'], None),
    'fit/llama_8b': ('fit', 'llama_8b', 'v5p-64', [], None),
    'fit/llama_8b/max': ('fit', 'llama_8b', 'v5p-64', ['--max_batch'], None),
    'fit/llama_8b/512': ('fit', 'llama_8b', 'v5p-1024', ['--config.mesh.data=8',
                                                         '--config.data.batch_size=512'], None),
    'fit/llama_8b/512x4': ('fit', 'llama_8b', 'v5p-1024', ['--config.mesh.data=8',
                                                           '--config.data.batch_size=2048'], None),
}
for attention in ('splash', 'xla'):
  for remat in ('full', 'projections', 'dots_saveable', 'none'):
    maxtext = MAXTEXT_1B.get((attention, 'minimal' if remat == 'projections' else remat))
    ROWS[f'remat/{attention}/{remat}/scan'] = ('remat', 'llama_1b', 'v5p-8', [
        f'--config.model.attention={attention}', f'--config.model.remat={remat}', '--noeval'],
                                               maxtext)
ROWS['remat/splash/full/loop'] = ('remat', 'llama_1b', 'v5p-8', [
    '--config.model.attention=splash', '--config.model.scan_layers=False', '--noeval'], None)
# The loss over chunks of 512 positions (model.loss_chunk), and a bf16 residual stream as
# MaxText's bf16 activations (model.residual_dtype).
MEMORY_VARIANTS = {'chunk': ['--config.model.loss_chunk=512'],
                   'chunk_bf16': ['--config.model.loss_chunk=512',
                                  '--config.model.residual_dtype=bfloat16']}
ROWS['remat/splash/full/loop/chunk_bf16'] = ('remat', 'llama_1b', 'v5p-8', [
    '--config.model.attention=splash', '--config.model.scan_layers=False', '--noeval']
    + MEMORY_VARIANTS['chunk_bf16'], MAXTEXT_1B[('splash', 'full')])
for remat in ('full', 'projections'):
  for variant, variant_flags in MEMORY_VARIANTS.items():
    ROWS[f'remat/splash/{remat}/scan/{variant}'] = ('remat', 'llama_1b', 'v5p-8', [
        '--config.model.attention=splash', f'--config.model.remat={remat}', '--noeval']
        + variant_flags, MAXTEXT_1B[('splash', 'minimal' if remat == 'projections' else remat)])
for context in (2048, 8192, 32768):
  for attention in ('splash', 'xla'):
    for remat in ('full', 'projections') if context == 8192 else ('full',):
      ROWS[f'context/{context}/{attention}/{remat}'] = ('context', 'llama_1b', 'v5p-8', [
          f'--config.model.attention={attention}', f'--config.model.remat={remat}',
          f'--config.data.seq_len={context}', f'--config.model.max_len={context}', '--noeval'],
                                                        None)
for chips, topology in ((16, 'v5p-32'), (64, 'v5p-128'), (256, 'v5p-512'), (512, 'v5p-1024')):
  for attention in ('splash', 'xla'):
    ROWS[f'weak/{attention}/{chips}'] = ('weak', 'llama_8b', topology, WEAK + [
        f'--config.model.attention={attention}', f'--config.data.batch_size={chips}',
        '--noeval'], MAXTEXT_WEAK.get(chips) if attention == 'xla' else None)
for chips, topology, mesh in ((32, 'v5p-64', []), (64, 'v5p-128', []),
                              (512, 'v5p-1024', ['--config.mesh.data=8'])):
  ROWS[f'weak8b/{chips}'] = ('weak8b', 'llama_8b', topology, mesh + [
      f'--config.data.batch_size={chips}', '--noeval'], None)


def run(name: str) -> dict:
  _, config, topology, flags, _ = ROWS[name]
  out = os.path.join('/tmp', 'tpu_plan_' + name.replace('/', '_') + '.json')
  command = [sys.executable, '-m', 'gpt_jax.aot', f'--config=configs/{config}.py',
             f'--topology={topology}', f'--json={out}'] + flags
  print('$', ' '.join(command[1:]), flush=True)
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
  print(result.stdout.strip(), flush=True)
  if not os.path.exists(out):
    raise SystemExit(f'{name} failed:\n{result.stderr[-3000:]}')
  with open(out, encoding='utf-8') as f:
    report = json.load(f)
  os.remove(out)
  report['command'] = ' '.join(['python'] + [c for c in command[1:] if c != f'--json={out}'])
  report['date'] = datetime.date.today().isoformat()
  return report


def gb(x) -> str:
  return f'{x / 1e9:.2f}' if x == x else '?'


def collective_gb(report) -> str:
  return gb(sum(c['bytes'] for c in report.get('collectives', {}).values()))


def _mesh(report: dict) -> str:
  mesh = report['mesh']
  return f"{mesh['data']}x{mesh['fsdp']}x{mesh['tensor']}"


def _attention(report: dict) -> str:
  return report.get('attention', '?')


def tables(results: dict) -> dict[str, str]:
  rows = {'fit': [], 'remat': [], 'context': [], 'weak': [], 'weak8b': []}
  for name, (table, config, topology, _, maxtext) in ROWS.items():
    report = results.get(name)
    if report is None or name.endswith('/max'):
      continue
    hbm = gb(report['hbm_bytes_per_chip']) + ('' if report.get('fits') else ' (does not fit)')
    temps = gb(report.get('temp_bytes', float('nan')))
    mt = f'{maxtext:.2f}' if maxtext else '-'
    if table == 'fit':
      best = results.get(name + '/max', {})
      rows['fit'].append(
          f"| `{config}` | {topology} ({report['chips']} chips) | {_mesh(report)} | "
          f"{report['global_batch']} x {report['seq_len']} | {_attention(report)} | {hbm} | "
          f"{best.get('max_global_batch', '-')} | "
          + (f"{report['roofline_mfu']:.0%} ({report['roofline_bound_by']})"
             if 'roofline_mfu' in report else '-') + f" | {collective_gb(report)} |")
    elif table == 'remat':
      _, attention, policy, layers, *variant = name.split('/')
      loss = {'chunk': 'chunks of 512, f32', 'chunk_bf16': 'chunks of 512, bf16'}.get(
          variant[0] if variant else '', 'whole, f32')
      rows['remat'].append(
          f"| {attention} | `{policy}` | {'scan' if layers == 'scan' else 'Python loop'} | "
          f"{loss} | {hbm} | {temps} | {mt} | {report.get('flops_per_chip', 0) / 1e12:.0f} | "
          f"{report.get('compile_s', 0):.0f} | {report['date']} |")
    elif table == 'context':
      _, context, attention, policy = name.split('/')
      rows['context'].append(f"| {context} | {attention} | `{policy}` | {hbm} | {temps} |")
    else:
      rows[table].append(
          f"| {report['chips']} ({topology}) | {_attention(report)} | {_mesh(report)} | "
          f"{hbm} | {temps} | {mt} | {collective_gb(report)} |")
  headers = {
      'fit': '| config | slice | mesh (data x fsdp x tensor) | global batch x context | '
             'attention | HBM per chip (GB) | max global batch | roofline MFU (bound) | '
             'collectives per step (GB) |\n|---|---|---|---|---|---|---|---|---|',
      'remat': '| attention | remat | layers | loss, residual stream | HBM per chip (GB) | '
               'of which temporaries | MaxText (GB) | TFLOP per chip per step | compile (s) | '
               'measured |\n|---|---|---|---|---|---|---|---|---|---|',
      'context': '| context | attention | remat | HBM per chip (GB) | of which temporaries |\n'
                 '|---|---|---|---|---|',
      'weak': '| chips | attention | mesh | HBM per chip (GB) | temporaries (GB) | MaxText total '
              '(GB) | collectives per step (GB) |\n|---|---|---|---|---|---|---|',
  }
  headers['weak8b'] = headers['weak']
  return {table: headers[table] + '\n' + '\n'.join(lines) for table, lines in rows.items()}


def render(results: dict) -> None:
  dates = sorted({r['date'] for r in results.values()})
  rendered = tables(results)
  path = os.path.join(HERE, 'README.md')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  for table, body in rendered.items():
    text = re.sub(rf'(<!-- tpu_plan:{table} -->\n)(?:.*?\n)?(<!-- /tpu_plan:{table} -->)',
                  lambda m: m.group(1) + body + '\n' + m.group(2), text, flags=re.S)
  text = re.sub(r'(<!-- tpu_plan:date -->).*?(<!-- /tpu_plan:date -->)',
                lambda m: m.group(1) + ', '.join(dates) + m.group(2), text)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', default='', help='run the rows whose name starts with this')
  parser.add_argument('--render', action='store_true', help='only render results.json')
  args = parser.parse_args()
  results = {}
  if os.path.exists(RESULTS):
    with open(RESULTS, encoding='utf-8') as f:
      results = json.load(f)
  if not args.render:
    for name in ROWS:
      if name.startswith(args.only):
        results[name] = run(name)
        with open(RESULTS, 'w', encoding='utf-8') as f:
          json.dump(results, f, indent=1, sort_keys=True)
  render(results)


if __name__ == '__main__':
  main()

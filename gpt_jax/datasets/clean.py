r"""Clean a corpus before pretraining: quality filters, exact and near-duplicate removal, PII.

    python -m gpt_jax.datasets.clean --input='corpus/*.jsonl' --out=clean \
        [--filters=gopher,c4,repetition] [--dedup=exact,minhash] [--minhash_threshold=0.8] \
        [--redact_pii] [--workers=N] [--executor=local|slurm|ray]
    python -m gpt_jax.train --config.data.text_files='clean/text/*.txt' ...

The pipeline is datatrove's (gpt_jax/datasets/cleaning.py); the cleaned text lands in
OUT/text/, a report in OUT/report.json. Started again with the same flags, a killed run
continues where it stopped. See docs/data_cleaning.md.
"""

import ast
import sys
import time

from absl import app, flags

from gpt_jax import cli
from gpt_jax.errors import ConfigError

_INPUT = flags.DEFINE_string('input', None, 'Glob of .txt (one document per file), .jsonl or '
                             '.parquet files.')
_OUT = flags.DEFINE_string('out', None, 'Output directory: text/, report.json, removed/, work/.')
_FILTERS = flags.DEFINE_list('filters', 'gopher,c4,repetition',
                             'Quality filters, in order (empty: none).')
_DEDUP = flags.DEFINE_list('dedup', 'exact,minhash', 'Deduplication methods (empty: none).')
_THRESHOLD = flags.DEFINE_float('minhash_threshold', 0.8, 'Word 5-gram Jaccard similarity at '
                                'which MinHash finds a near-duplicate pair with p >= 0.92.')
_REDACT = flags.DEFINE_bool('redact_pii', False, 'Replace email addresses, public IP addresses '
                            'and phone numbers.')
_TEXT_KEY = flags.DEFINE_string('text_key', 'text', 'The text field of JSONL/parquet records.')
_WORKERS = flags.DEFINE_integer('workers', 1, 'Local worker processes.')
_TASKS = flags.DEFINE_integer('tasks', 0, 'Tasks (and output shards); 0: one per input file, '
                              'at most 64. Keep it when resuming a run.')
_EXECUTOR = flags.DEFINE_enum('executor', 'local', ['local', 'slurm', 'ray'],
                              'datatrove executor that runs the tasks.')
_EXECUTOR_ARGS = flags.DEFINE_list('executor_args', [], 'key=value arguments of the datatrove '
                                   'executor, e.g. partition=cpu,time=04:00:00 for slurm.')


def parse_executor_args(items) -> tuple[tuple[str, object], ...]:
  result = []
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ConfigError(f'--executor_args: expected key=value, got {item!r}')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string such as 04:00:00
    result.append((key, value))
  return tuple(result)


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  cli.quiet_logs()
  with cli.one_line_errors():  # also: datatrove not installed, which extra brings it
    # pylint: disable=import-outside-toplevel
    from gpt_jax.datasets import cleaning, cleaning_report
    if not _INPUT.value or not _OUT.value:
      raise ConfigError('--input and --out are required.')
    config = cleaning.CleanConfig(
        input=_INPUT.value, out=_OUT.value, filters=tuple(_FILTERS.value),
        dedup=tuple(_DEDUP.value), minhash_threshold=_THRESHOLD.value, redact_pii=_REDACT.value,
        text_key=_TEXT_KEY.value, tasks=_TASKS.value, workers=_WORKERS.value,
        executor=_EXECUTOR.value, executor_args=parse_executor_args(_EXECUTOR_ARGS.value))
    if config.workers < 1:
      raise ConfigError(f'--workers must be >= 1, got {config.workers}')
    stages = cleaning.executors(config, cleaning_report.ReportStep(config.out))
    if config.executor == 'slurm':  # submits every stage as a job depending on the one before
      stages[-1].run()
      print(f'Submitted; {config.out}/report.json is written when the last job ends.')
      return
    if config.executor == 'ray':
      try:
        import ray  # pylint: disable=import-outside-toplevel
      except ModuleNotFoundError:
        raise ConfigError('--executor=ray needs ray: pip install ray') from None
      ray.init()  # joins the cluster RAY_ADDRESS names, else starts one on this machine
    seconds = {}
    for name, stage in zip(cleaning.stage_names(stages), stages):
      start = time.time()
      stage.run()  # the stages before it have run: it does not start them again
      seconds[name] = round(time.time() - start, 2)
    report = cleaning_report.build(config.out, stage_seconds=seconds)
    path = cleaning_report.write(config.out, report)
    print(cleaning_report.table(report))
    print(f'report: {path}\ntrain on it: --config.data.text_files={config.out}/text/*.txt')


if __name__ == '__main__':  # datatrove's local executor starts worker processes from here
  app.run(main)

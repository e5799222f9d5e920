"""Corpus cleaning as a datatrove pipeline: quality filters, exact and MinHash near-duplicate
removal and PII redaction, written as text shards that the `text_files` builder reads.

The stages, each a datatrove executor that depends on the one before (local processes, Slurm
jobs or Ray tasks). Every task leaves a completion marker in OUT/work/logs/<stage>/completions,
so a killed run started again with the same command continues where it stopped.

  1. filter             (T tasks)  read -> normalize unicode and whitespace -> quality filters
                                   -> OUT/work/filtered/<rank>.jsonl, exact-dedup signatures
  2. exact              (1 task)   exact duplicates among all signatures
  3. minhash_signatures (T tasks)  filtered minus exact duplicates -> MinHash signatures
  4. minhash_buckets    (B tasks)  candidate pairs, one task per LSH bucket
  5. minhash_clusters   (1 task)   pairs -> clusters; all but one of each is removed
  6. write              (T tasks)  filtered minus duplicates -> PII redaction -> OUT/text/<rank>.txt
                                   (redaction comes after dedup: its replacements would make
                                   copies differ)
  7. report             (1 task)   OUT/report.json from the stages' datatrove stats

Documents removed by a filter or a dedup stage are kept in OUT/removed/<stage>/ for inspection.
"""

import dataclasses
import glob as glob_lib
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Sequence

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.io import get_datafolder
from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                      ExactFindDedups, MinhashConfig, MinhashDedupBuckets,
                                      MinhashDedupCluster, MinhashDedupFilter,
                                      MinhashDedupSignature)
from datatrove.pipeline.filters import (C4QualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter, LambdaFilter)
from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.formatters.pii import PIIReplacer
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.word_tokenizers import WordTokenizer

from gpt_jax.errors import ConfigError

FILTERS = ('gopher', 'c4', 'repetition')
DEDUPS = ('exact', 'minhash')
EXECUTORS = ('local', 'slurm', 'ray')
# What separates documents in a text shard: `text_files` reads each shard as one document.
DOCUMENT_SEPARATOR = '\n\n'
# MinHash: 8 hashes per LSH bucket (datatrove's default); the number of buckets is the smallest
# that finds a pair at the threshold with at least this probability (14 buckets for 0.8, as
# datatrove's default).
HASHES_PER_BUCKET = 8
DETECTION_AT_THRESHOLD = 0.92


@dataclasses.dataclass(frozen=True)
class CleanConfig:
  input: str  # a glob of .txt (one document per file), .jsonl[.gz|.zst] or .parquet files
  out: str
  filters: tuple[str, ...] = FILTERS
  dedup: tuple[str, ...] = DEDUPS
  minhash_threshold: float = 0.8  # word 5-gram Jaccard similarity
  redact_pii: bool = False
  text_key: str = 'text'  # the text field of JSONL and parquet records
  tasks: int = 0  # 0: one per input file, at most 64
  workers: int = 1  # tasks run at once (local executor)
  executor: str = 'local'
  executor_args: tuple[tuple[str, object], ...] = ()  # extra arguments of the executor


# ------------------------------------------------------------------------- reading and writing


class TextFileReader(BaseDiskReader):
  """Each text file is one document, as in the `text_files` builder."""

  name = 'text files'

  def read_file(self, filepath: str):
    with self.data_folder.open(filepath, 'rb', compression='infer') as f:
      data = f.read()
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError as e:
      raise ConfigError(f'{filepath} is not UTF-8 text (byte {e.start})') from None
    with self.track_time():
      document = self.get_document_from_dict({'text': text}, filepath, 0)
    if document:
      yield document


class RankFileReader(JsonlReader):
  """Reads back the one file <rank>.jsonl that task `rank` of an earlier stage wrote: the
  dedup stages number documents within a task, so each task must see the same documents."""

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    name = f'{rank:05d}.jsonl'
    if self.data_folder.isfile(name):  # absent when the filters left this task nothing
      for document in self.read_files_shard([name]):
        self.update_doc_stats(document)
        yield document


class TextShardWriter(DiskWriter):
  """Documents as plain text, separated by a blank line, one file per task."""

  default_output_filename = '${rank}.txt'
  name = 'text shards'

  def __init__(self, output_folder):
    super().__init__(output_folder, compression=None, mode='wb')

  def _write(self, document: dict, file_handler, filename: str):
    file_handler.write((document['text'] + DOCUMENT_SEPARATOR).encode('utf-8'))


def split_glob(pattern: str) -> tuple[str, str]:
  """('corpus', '**/*.txt') for 'corpus/**/*.txt': the folder before the first wildcard."""
  parts = pattern.split('/')
  for i, part in enumerate(parts):
    if glob_lib.has_magic(part):
      return '/'.join(parts[:i]) or '.', '/'.join(parts[i:])
  return os.path.dirname(pattern) or '.', os.path.basename(pattern)


def input_format(files: Sequence[str]) -> str:
  """'text', 'jsonl' or 'parquet', from the files' names; one format per run."""
  def format_of(name):
    name = re.sub(r'\.(gz|zst|bz2|xz)$', '', name)
    for suffix, kind in (('.txt', 'text'), ('.jsonl', 'jsonl'), ('.json', 'jsonl'),
                         ('.parquet', 'parquet')):
      if name.endswith(suffix):
        return kind
    raise ConfigError(f'--input: {name} is not .txt, .jsonl or .parquet')
  kinds = {format_of(f) for f in files}
  if len(kinds) > 1:
    raise ConfigError(f'--input matches files of several formats ({sorted(kinds)}); '
                      'clean one format per run.')
  return kinds.pop()


def input_files(pattern: str) -> list[str]:
  folder, glob_pattern = split_glob(pattern)
  files = get_datafolder(folder).list_files(glob_pattern=glob_pattern) if (
      '://' in folder or os.path.isdir(folder)) else []
  if not files:
    raise FileNotFoundError(f'--input matches no files: {pattern!r}')
  return files


def make_reader(config: CleanConfig, files: Sequence[str]):
  folder, glob_pattern = split_glob(config.input)
  kind = input_format(files)
  if kind == 'text':
    return TextFileReader(folder, glob_pattern=glob_pattern)
  reader = JsonlReader if kind == 'jsonl' else ParquetReader
  return reader(folder, glob_pattern=glob_pattern, text_key=config.text_key)


# ------------------------------------------------------------------------------ normalization


class WhitespaceFormatter(BaseFormatter):
  """Unix line ends, no trailing spaces, at most one blank line in a row, no blank lines at
  the ends. Indentation stays (code keeps its meaning)."""

  name = 'whitespace'
  _TRAILING = re.compile(r'[ \t\f\v]+$', re.MULTILINE)
  _BLANK_LINES = re.compile(r'\n{3,}')

  def format(self, text: str) -> str:
    text = text.replace('\r\n', '\n').replace('\r', '\n')
    text = self._TRAILING.sub('', text)
    return self._BLANK_LINES.sub('\n\n', text).strip('\n')


def has_text(document: Document) -> bool:
  return bool(document.text.strip())


def normalizers() -> list:
  """Unicode repair and NFC (ftfy), then whitespace; documents left empty are dropped."""
  return [FTFYFormatter(normalization='NFC'), WhitespaceFormatter(), LambdaFilter(has_text)]


# ------------------------------------------------------------------------------- quality filters


class PlainTokenizer(WordTokenizer):
  """Words as whitespace separates them, sentences ending in . ! or ? before a space.

  Gopher's rules count whitespace-separated words ("fox," is one word); datatrove's default
  English tokenizer (spacy) makes each punctuation mark a word of its own, so that ordinary
  punctuated prose fails Gopher's "80% of words hold a letter" rule. C4 only counts sentences
  (at least 5), which this does ~20x faster than spacy, with the same result on our corpora. MinHash shingles text datatrove has
  already simplified (lower case, no punctuation), where splitting on spaces gives spacy's words.
  """

  _SENTENCE_END = re.compile(r'[.!?]+[)"\'\]]*(?=\s|$)')

  def word_tokenize(self, text: str) -> list[str]:
    return text.split()

  def sent_tokenize(self, text: str) -> list[str]:
    return [text[a:b].strip() for a, b in self.span_tokenize(text) if text[a:b].strip()]

  def span_tokenize(self, text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for end in self._SENTENCE_END.finditer(text):
      spans.append((start, end.end()))
      start = end.end()
    if text[start:].strip():
      spans.append((start, len(text)))
    return spans


def quality_filter(name: str, removed_folder: str | None = None):
  """A datatrove filter; what each removes is in docs/data_cleaning.md."""
  writer = (JsonlWriter(os.path.join(removed_folder, name), compression=None)
            if removed_folder else None)
  if name == 'gopher':  # Gopher's (Rae et al. 2021) quality rules
    return GopherQualityFilter(exclusion_writer=writer, language=PlainTokenizer())
  if name == 'c4':
    # C4's document rules and its javascript / cookie-policy line removal, without its removal
    # of lines under 3 words or without terminal punctuation, which cuts code, verse and
    # dialogue to pieces (FineWeb, too, leaves out the punctuation rule).
    return C4QualityFilter(filter_no_terminal_punct=False, min_words_per_line=-1,
                           exclusion_writer=writer, language=PlainTokenizer())
  if name == 'repetition':  # Gopher's repeated lines, paragraphs and n-grams
    return GopherRepetitionFilter(exclusion_writer=writer, language=PlainTokenizer())
  raise ConfigError(f'--filters: unknown filter {name!r}; known: {", ".join(FILTERS)}')


# ---------------------------------------------------------------------------------- deduplication


def exact_key(document: Document) -> str:
  """What exact deduplication compares: the text with its whitespace runs made single spaces."""
  return ' '.join(document.text.split())


def minhash_buckets(threshold: float) -> int:
  """The fewest LSH buckets of HASHES_PER_BUCKET hashes that find a pair with word 5-gram
  Jaccard similarity `threshold` with probability DETECTION_AT_THRESHOLD."""
  if not 0 < threshold < 1:
    raise ConfigError(f'--minhash_threshold must be in (0, 1), got {threshold}')
  hit = threshold ** HASHES_PER_BUCKET  # one bucket's chance of holding both documents
  return max(1, math.ceil(math.log(1 - DETECTION_AT_THRESHOLD) / math.log1p(-hit)))


def detection_probability(jaccard: float, threshold: float) -> float:
  """The chance that the MinHash stages find a pair of documents at `jaccard`."""
  return 1 - (1 - jaccard ** HASHES_PER_BUCKET) ** minhash_buckets(threshold)


def minhash_config(threshold: float) -> MinhashConfig:
  return MinhashConfig(n_grams=5, num_buckets=minhash_buckets(threshold),
                       hashes_per_bucket=HASHES_PER_BUCKET)


# ------------------------------------------------------------------------------------ pipeline


class PhoneFormatter(BaseFormatter):
  """Replaces phone numbers (international +CC or North American forms) with a fixed one."""

  name = 'phone numbers'
  PATTERN = (r'(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}'
             r'(?![\w])')

  def __init__(self, replacement: str = '555-0100'):
    super().__init__()
    self.replacer = PIIReplacer(self.PATTERN, replacement)

  def format(self, text: str) -> str:
    return self.replacer.replace(text)


def redactors() -> list:
  """datatrove's email and public IP replacement, and phone numbers."""
  return [PIIFormatter(), PhoneFormatter()]


@dataclasses.dataclass
class Stage:
  name: str
  pipeline: list
  tasks: int


def num_tasks(config: CleanConfig, files: Sequence[str]) -> int:
  if config.tasks < 0:
    raise ConfigError(f'--tasks must be >= 0, got {config.tasks}')
  return config.tasks or min(len(files), 64)


def stages(config: CleanConfig, files: Sequence[str]) -> list[Stage]:
  """The stages of the run `config` describes, in order."""
  for name in config.dedup:
    if name not in DEDUPS:
      raise ConfigError(f'--dedup: unknown method {name!r}; known: {", ".join(DEDUPS)}')
  for flag, names in (('--filters', config.filters), ('--dedup', config.dedup)):
    if len(set(names)) < len(names):
      raise ConfigError(f'{flag} names a stage twice: {",".join(names)}')
  tasks = num_tasks(config, files)
  work = os.path.join(config.out, 'work')
  removed = os.path.join(config.out, 'removed')
  filtered = os.path.join(work, 'filtered')
  exact = ExactDedupConfig(content_getter=exact_key)
  exact_sigs, exact_dups = os.path.join(work, 'exact', 'signatures'), os.path.join(work, 'exact', 'duplicates')
  minhash = minhash_config(config.minhash_threshold)
  minhash_dir = os.path.join(work, 'minhash')

  def drop_exact(keep_removed=False):
    if 'exact' not in config.dedup:
      return []
    writer = JsonlWriter(os.path.join(removed, 'exact'), compression=None) if keep_removed else None
    return [ExactDedupFilter(exact_dups, config=exact, exclusion_writer=writer)]

  result = [Stage('filter', [
      make_reader(config, files), *normalizers(),
      *(quality_filter(name, removed) for name in config.filters),
      JsonlWriter(filtered, compression=None),
      *([ExactDedupSignature(exact_sigs, config=exact)] if 'exact' in config.dedup else []),
  ], tasks)]
  if 'exact' in config.dedup:
    result.append(Stage('exact', [ExactFindDedups(exact_sigs, exact_dups, config=exact)], 1))
  if 'minhash' in config.dedup:
    result += [
        Stage('minhash_signatures', [RankFileReader(filtered), *drop_exact(),
                                     MinhashDedupSignature(os.path.join(minhash_dir, 'signatures'),
                                                           config=minhash,
                                                           language=PlainTokenizer())], tasks),
        Stage('minhash_buckets', [MinhashDedupBuckets(os.path.join(minhash_dir, 'signatures'),
                                                      os.path.join(minhash_dir, 'buckets'),
                                                      config=minhash)], minhash.num_buckets),
        Stage('minhash_clusters', [MinhashDedupCluster(os.path.join(minhash_dir, 'buckets'),
                                                       os.path.join(minhash_dir, 'remove_ids'),
                                                       config=minhash, save_cluster_size=True)], 1),
    ]
  result.append(Stage('write', [
      RankFileReader(filtered), *drop_exact(keep_removed=True),
      *([MinhashDedupFilter(os.path.join(minhash_dir, 'remove_ids'),
                            exclusion_writer=JsonlWriter(os.path.join(removed, 'minhash'),
                                                         compression=None))]
        if 'minhash' in config.dedup else []),
      *(redactors() if config.redact_pii else []),
      TextShardWriter(os.path.join(config.out, 'text')),
  ], tasks))
  return result


def executor_class(name: str) -> type[PipelineExecutor]:
  if name == 'local':
    return LocalPipelineExecutor
  if name == 'slurm':
    from datatrove.executor import SlurmPipelineExecutor  # pylint: disable=import-outside-toplevel
    return SlurmPipelineExecutor
  if name == 'ray':
    from datatrove.executor import RayPipelineExecutor  # pylint: disable=import-outside-toplevel
    return RayPipelineExecutor
  raise ConfigError(f'--executor must be one of {", ".join(EXECUTORS)}, got {name!r}')


def claim_output(config: CleanConfig, files: Sequence[str]) -> None:
  """Records the settings that decide the output in OUT/work/settings.json; refuses an OUT
  that holds a run with other settings, whose completed tasks would otherwise be kept."""
  settings = {'input': config.input, 'files': len(files), 'filters': list(config.filters),
              'dedup': list(config.dedup), 'minhash_threshold': config.minhash_threshold,
              'redact_pii': config.redact_pii, 'text_key': config.text_key,
              'tasks': num_tasks(config, files)}
  folder = get_datafolder(os.path.join(config.out, 'work'))
  if folder.isfile('settings.json'):
    with folder.open('settings.json', 'r') as f:
      before = json.load(f)
    changed = sorted(k for k in settings if before.get(k) != settings[k])
    if changed:
      raise ConfigError(f'{config.out} holds a run with other {", ".join(changed)} '
                        f'({", ".join(f"{k}={before.get(k)!r}" for k in changed)}): resume it '
                        'with the same flags, or clean into another --out.')
  else:
    with folder.open('settings.json', 'w') as f:
      json.dump(settings, f, indent=1)


def executors(config: CleanConfig, report_step: Callable) -> list[PipelineExecutor]:
  """One executor per stage, each depending on the one before; running the last runs all."""
  files = input_files(config.input)
  cls = executor_class(config.executor)
  extra = dict(config.executor_args)
  accepted = inspect.signature(cls.__init__).parameters
  ours = ('self', 'pipeline', 'tasks', 'logging_dir', 'depends')
  for key in extra:
    if key not in accepted or key in ours:
      raise ConfigError(f'--executor_args: {cls.__name__} takes no argument {key!r}')
  missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty
             and p.kind is p.POSITIONAL_OR_KEYWORD and k not in ours and k not in extra]
  if missing:
    raise ConfigError(f'--executor={config.executor} needs --executor_args with '
                      f'{", ".join(f"{k}=..." for k in missing)}')
  logs = os.path.join(config.out, 'work', 'logs')
  result = []
  planned = stages(config, files)
  claim_output(config, files)
  for stage in [*planned, Stage('report', [report_step], 1)]:
    kwargs = dict(extra)
    if config.executor == 'local':
      kwargs['workers'] = min(config.workers, stage.tasks)
    elif config.executor == 'slurm':
      kwargs['job_name'] = f'clean_{stage.name}'
    result.append(cls(stage.pipeline, tasks=stage.tasks, logging_dir=os.path.join(logs, stage.name),
                      depends=result[-1] if result else None, **kwargs))
  return result


def stage_names(executors_: Sequence[PipelineExecutor]) -> list[str]:
  """The stage each executor runs, from its logging folder."""
  return [os.path.basename(e.logging_dir.path.rstrip('/')) for e in executors_]

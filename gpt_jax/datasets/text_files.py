"""`text_files`: a TFDS dataset built from local text files matching a glob.

Each file is one document. As in nanoGPT, the first `1 - val_fraction` of its
characters go to `train` and the rest to `validation`.

The glob arrives as a BuilderConfig made by `builder_config(pattern, val_fraction)`,
named by a hash of the matched files (absolute path, size, mtime) and the split
fraction: two different globs never share a directory under the TFDS data dir,
and an unchanged glob finds its dataset already built.

    config = text_files.builder_config('data/*.txt', val_fraction=0.1)
    train = tfds.data_source('text_files', split='train', builder_kwargs={
        'config': config, 'file_format': 'array_record'})
"""

import dataclasses
import glob
import hashlib
import json
import os

import tensorflow_datasets as tfds
from gpt_jax.errors import ConfigError


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
  """nanoGPT's split: (first 1 - val_fraction of the characters, the rest)."""
  if not 0 <= val_fraction < 1:
    raise ConfigError(f'data.val_fraction must be in [0, 1), got {val_fraction}.')
  cut = int(len(text) * (1 - val_fraction))
  return text[:cut], text[cut:]


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  files: tuple[str, ...] = ()  # Absolute paths, sorted.
  val_fraction: float = 0.1


def builder_config(pattern: str, val_fraction: float) -> TextFilesConfig:
  """The config for the files matching `pattern` as they are on disk now."""
  files = sorted(os.path.abspath(f)
                 for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(f))
  if not files:
    raise FileNotFoundError(f'data.text_files matches no files: {pattern!r}')
  identity = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
  if not any(size for _, size, _ in identity):
    raise ConfigError(f'data.text_files: every file matching {pattern!r} is empty')
  digest = hashlib.sha256(json.dumps([identity, val_fraction]).encode()).hexdigest()
  return TextFilesConfig(
      name=digest[:16],
      description=f'{len(files)} files matching {pattern!r}',
      files=tuple(files),
      val_fraction=val_fraction,
  )


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """Local text files, one document per file."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n')[0],
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True,  # Keep the files in sorted order.
    )

  def _split_generators(self, dl_manager):
    if not isinstance(self.builder_config, TextFilesConfig):
      raise ConfigError('text_files needs the files to read: pass '
                       "config=gpt_jax.datasets.text_files.builder_config(glob, val_fraction).")
    return {'train': self._generate_examples(part=0),
            'validation': self._generate_examples(part=1)}

  def _generate_examples(self, part):
    for index, path in enumerate(self.builder_config.files):
      with open(path, 'rb') as f:
        data = f.read()
      try:
        text = data.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ConfigError(f'{path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r})'
                          ) from None
      yield index, {'text': split_text(text, self.builder_config.val_fraction)[part]}

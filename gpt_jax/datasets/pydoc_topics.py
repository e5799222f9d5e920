"""`pydoc_topics`: the documentation text that ships with CPython, as a TFDS dataset.

`pydoc_data.topics.topics` maps ~79 help topics ("assert", "with", "types", ...) to
their text from the Python reference manual, ~465 KB of English prose and code in
the standard library: a corpus every machine has, so the default config trains
offline. Documents come in sorted topic order; as in nanoGPT, the first
`1 - val_fraction` of each document's characters go to `train` and the rest to
`validation`.

The text changes between Python releases, so the config name carries the Python
version along with the split fraction (e.g. `py3.11.7-val0.1`).
"""

import dataclasses
import platform

import pydoc_data.topics
import tensorflow_datasets as tfds

from gpt_jax.datasets.text_files import split_text


@dataclasses.dataclass(eq=False)
class PydocTopicsConfig(tfds.core.BuilderConfig):
  val_fraction: float = 0.1


def _make_config(val_fraction: float) -> PydocTopicsConfig:
  return PydocTopicsConfig(name=f'py{platform.python_version()}-val{val_fraction:g}',
                           val_fraction=val_fraction)


_DEFAULT_CONFIG = _make_config(0.1)


def builder_config(val_fraction: float) -> PydocTopicsConfig:
  """The config splitting off `val_fraction` of each document for validation."""
  # TFDS refuses a new config object named like one of BUILDER_CONFIGS.
  if val_fraction == _DEFAULT_CONFIG.val_fraction:
    return _DEFAULT_CONFIG
  return _make_config(val_fraction)


class PydocTopics(tfds.core.GeneratorBasedBuilder):
  """CPython's pydoc topic help texts."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [_DEFAULT_CONFIG]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n')[0],
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True,  # Keep the topics in sorted order.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(part=0),
            'validation': self._generate_examples(part=1)}

  def _generate_examples(self, part):
    topics = pydoc_data.topics.topics
    for index, name in enumerate(sorted(topics)):
      yield index, {'text': split_text(topics[name], self.builder_config.val_fraction)[part]}

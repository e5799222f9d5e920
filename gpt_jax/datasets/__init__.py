"""TFDS builders for gpt_jax's own corpora. Importing this package registers them.

- `pydoc_topics`: the English documentation text shipped with CPython
  (`pydoc_data.topics`); the default corpus, available offline everywhere.
- `text_files`: any local text files, selected by a glob.

Both build `array_record` files, which `tfds.data_source` reads without TensorFlow.
"""

from gpt_jax.datasets import pydoc_topics  # registers the builder
from gpt_jax.datasets import text_files

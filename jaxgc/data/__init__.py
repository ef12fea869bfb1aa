"""Datasets and per-step chunking for the training loop.

Everything here is deterministic from seeds: the train/test split from
``split_seed``, the batch of step ``s`` from ``(data_key, s)``. So a resumed run
sees the same batches as an uninterrupted one, and every protocol sees the same
chunks at the same step (which is what makes exact-mode runs comparable).

The input pipeline is grain's: a source of examples (:class:`ArraySource`, or any
``grain.MapDataset`` or random-access source), shuffled by ``(data_key, epoch)``,
batched and chunked into ``[N, batch/N, ...]`` by :class:`StepChunks` (a
``grain.MapDataset`` whose element ``s`` is step ``s``'s chunks), and read by
:class:`ChunkIterator` (a ``grain.DatasetIterator``: ``get_state``/``set_state``
for checkpoints). :func:`chunked` builds both for an own loop.

Nothing downloads: ``digits`` ships with scikit-learn, ``synthetic_*`` is
generated, ``pystdlib`` is the byte-level text of the running Python's own
standard library ``.py`` files, and ``custom`` calls the user's own
``MODULE:FUNCTION`` (:func:`load_custom`).
"""
from jaxgc.data._datasets import (
  DATASETS,
  Dataset,
  batch_indices,
  check_chunking,
  epoch_permutation,
  load,
  load_digits,
  load_pystdlib,
  load_synthetic_linear,
  load_synthetic_logistic,
  stdlib_corpus,
  step_chunks,
  steps_per_epoch,
)
from jaxgc.data._pipeline import (
  ArraySource,
  ChunkIterator,
  StepChunks,
  chunked,
  data_key,
  examples,
  import_source,
  load_custom,
)

__all__ = ["Dataset", "load", "steps_per_epoch", "epoch_permutation", "batch_indices",
           "step_chunks", "DATASETS", "stdlib_corpus", "check_chunking", "load_digits",
           "load_synthetic_logistic", "load_synthetic_linear", "load_pystdlib", "load_custom",
           "import_source", "ArraySource", "examples", "StepChunks", "ChunkIterator", "chunked",
           "data_key"]

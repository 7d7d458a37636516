"""What each task means, behind one protocol, so that every face (Python API, CLI, server, benchmarks) goes
through the same door and adding a task means adding a module, not editing the faces.

A task module defines:
  MODELS                  the model names it trains, the default first
  OPTIONS                 its own training options with their defaults (e.g. detect: minutes, input_size)
  default_config(model, **overrides) -> TrainConfig
  load_data(data, split, data_dir=None)              a split of a registered dataset or a user's folder
  show(dataset, n, path) -> Path                     a PNG sheet of samples with their labels, masks or boxes
  train(data, model, config, *, run_dir, data_dir, resume, progress, **OPTIONS) -> (model, summary)
  evaluate(model, dataset, out_dir=None) -> dict     metrics; with out_dir also eval.json and figures
  predict(model, images, sources, *, batch_size, **options) -> [result]   results have .to_json() and .save()
  export(model, format, path) -> str                 writes the file, checks it, says what was checked
`model` is the nn.Module that `ocula.modelfile.load_model` returns, with its ModelInfo as `.info`.
"""

from __future__ import annotations

import importlib

from ocula.errors import OculaError

# classify, segment, detect; the segmentation task lives beside `segment`, which holds its losses and metrics.
# recognize: nearest neighbours over a gallery of embeddings (ocula.index). represent: codes learnt without labels.
TASKS = {"classify": "ocula.tasks.classify", "segment": "ocula.tasks.segment_train", "detect": "ocula.tasks.detect",
         "recognize": "ocula.tasks.recognize", "represent": "ocula.tasks.represent"}


def get_task(name: str):
    """The module implementing task `name`."""
    if name not in TASKS:
        raise OculaError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


"""Input pipelines over TFDS: ImageNet with the original's transforms, any TFDS image dataset,
the embedded `sttn_digits` demo set and a tiny fabricated ImageNet for smoke runs.

- `sources`: the datasets, their splits and shards, and the checks and preparation before a run;
- `pipeline`: `make_train_dataset(config, ...)`, `make_eval_dataset(config, ...)`;
- `digits`, `fabricate`: the data sets sttn-jax builds itself.
Importing these modules does not import TensorFlow; using them does (`tf_import`).
"""

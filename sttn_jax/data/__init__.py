"""Input pipelines over TFDS: ImageNet with the original's transforms, any TFDS image dataset, the
embedded `sttn_digits` demo set and a tiny fabricated ImageNet for smoke runs. `sources`: datasets,
splits, shards, checks and preparation; `pipeline`: `make_train_dataset`, `make_eval_dataset` and
`numpy_batches` to read them; `digits`, `fabricate`: the data sets sttn-jax builds itself. Importing
these modules does not import TensorFlow; using them does (`tf_import`).
"""

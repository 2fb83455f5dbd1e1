"""Input pipelines over TFDS (`sources`, `pipeline`) and the data sets sttn-jax builds itself
(`digits`, `fabricate`). Importing these modules does not import TensorFlow; using them does.
"""

"""The errors sttn-jax expects, each message naming what is wrong and the fix (the tools print it as
one `error: ...` line, exit status 2). Anything else is a bug and keeps its traceback."""


class ConfigError(ValueError):
    """A config value or flag that cannot work; the message names the key and the fix."""


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be used; the message names the file and the fix."""


class ArchMismatchError(CheckpointError):
    """A checkpoint holds another architecture than the one asked for (`found`: one of sttn-jax's
    archs or another recognised model); the tools reword it in flags (`cli.in_flag_words`)."""

    def __init__(self, path, found: str, wanted: str, known: bool = True):
        from sttn_jax import archs  # archs raises errors of this module

        self.path, self.found, self.wanted, self.known = path, found, wanted, known
        if not known:
            fix = f"give a {wanted} checkpoint"
        elif (found, wanted) == (archs.BWX2, archs.TERNARY):
            fix = f"merge it first (sttn_jax.merging), or ask for arch {found!r}"
        else:
            fix = f"ask for arch {found!r}, or for none (arch=None: whatever the file holds)"
        super().__init__(f"{path}: holds a {found} model, not {wanted}; {fix}")


class MergeCheckError(CheckpointError):
    """The merged model's logits differ from the bwx2 model's beyond the tolerance; none written."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written during training; the earlier checkpoints are intact."""


class DatasetNotPreparedError(ValueError):
    """The TFDS dataset has not been prepared (built) in the data directory."""


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir; the message names its host and pid."""


EXPECTED = (ConfigError, CheckpointError, CheckpointWriteError, DatasetNotPreparedError,
            WorkdirLockedError, FloatingPointError, FileNotFoundError)

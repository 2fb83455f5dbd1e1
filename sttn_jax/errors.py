"""The errors sttn-jax expects: bad input, unusable files, a full disk. Each message names what is
wrong and the fix; the command-line tools print it as one `error: ...` line and exit with status 2
(`sttn_jax.cli.one_line_errors`). Anything else is a bug and keeps its traceback."""


class ConfigError(ValueError):
    """A config value or flag that cannot work; the message names the key and the fix."""


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be used; the message names the file and the fix."""


class ArchMismatchError(CheckpointError):
    """A checkpoint holds another architecture than the one asked for. `found` may be one of
    sttn-jax's archs or another model the file was recognised as (e.g. torchvision's resnet18).
    The message speaks of the `arch` parameter; the command-line tools say it in their flags
    (`sttn_jax.cli.in_flag_words`)."""

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
    """A checkpoint could not be written during training (disk full, quota, read-only disk); the
    earlier checkpoints are intact and the same command resumes once the cause is fixed."""


class DatasetNotPreparedError(ValueError):
    """The TFDS dataset has not been prepared (built) in the data directory."""


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir; the message names its host and pid."""


EXPECTED = (ConfigError, CheckpointError, CheckpointWriteError, DatasetNotPreparedError,
            WorkdirLockedError, FloatingPointError, FileNotFoundError)

"""Whole-or-nothing writes (written aside, then renamed into place) and the one JSON writer
(reports, metrics, model metadata): indented, with a final newline."""
import contextlib
import json
import os
import shutil
from pathlib import Path


def staged_path(path: Path) -> Path:
    """Where an output is written before it is complete: beside it, then renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def written_aside(path):
    """Yields the staged path (a file or a directory) to write; renamed to `path` when the block
    ends without error, removed otherwise."""
    staged = staged_path(Path(path))
    try:
        yield staged
        os.replace(staged, path)
    finally:
        if staged.is_dir():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            staged.unlink(missing_ok=True)


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_aside(path) as staged:
        staged.write_text(json.dumps(obj, indent=2) + "\n")
    return path

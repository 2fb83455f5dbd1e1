"""The one JSON writer (reports, metrics, model metadata): indented, a final newline, and whole or
not at all (written aside, then renamed)."""
import json
import os
from pathlib import Path


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staged.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return path

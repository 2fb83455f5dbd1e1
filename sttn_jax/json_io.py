"""The one JSON writer (reports, metrics, model metadata): indented, a final newline."""
import json
from pathlib import Path


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path

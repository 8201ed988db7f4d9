"""The versioned file `sollol train` writes and the router loads: JSON, no pickle.

A file is accepted only when its format, format version, feature schema
version and feature names match this SOLLOL's; anything else raises
ModelArtifactError naming the mismatch, so a reload can keep the model it has.
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelArtifactError
from .features import FEATURE_COUNT, FEATURE_NAMES, FEATURE_SCHEMA_VERSION
from .forest import Forest

ARTIFACT_FORMAT = "sollol-latency-model"
ARTIFACT_VERSION = 1
# Artifacts larger than this are rejected before parsing; a 100-tree model is
# about 1 MB.
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Forests predicting a request's latency (and time to first token) on a node, in ms."""

    latency: Forest
    ttft: Forest | None
    node_names: tuple[str, ...]
    model_names: tuple[str, ...]
    # sklearn_version, trained_at, data_span, metrics, training parameters.
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        span = self.info.get("data_span", {})
        return (
            f"trained {self.info.get('trained_at', '?')} on {span.get('rows', '?')} rows "
            f"from {span.get('first', '?')} to {span.get('last', '?')}"
        )


def save_artifact(model: LatencyModel, path: Path) -> None:
    """Write the artifact atomically: a watcher never sees a half-written file."""
    document = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "features": list(FEATURE_NAMES),
        "nodes": list(model.node_names),
        "models": list(model.model_names),
        **model.info,
        "targets": {
            "latency_ms": model.latency.to_dict(),
            "ttft_ms": None if model.ttft is None else model.ttft.to_dict(),
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(document, file, allow_nan=False)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_artifact(path: Path) -> LatencyModel:
    """Read and check an artifact; raise ModelArtifactError saying why it cannot be used."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_ARTIFACT_BYTES:
            raise ModelArtifactError(
                f"{path} is {size} bytes, over the {MAX_ARTIFACT_BYTES}-byte limit"
            )
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelArtifactError(f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ModelArtifactError(f"{path} is not a JSON object")
    _check_header(document, path)
    targets = document.get("targets")
    if not isinstance(targets, dict) or "latency_ms" not in targets:
        raise ModelArtifactError(f"{path} has no latency_ms model")
    ttft = targets.get("ttft_ms")
    return LatencyModel(
        latency=Forest.from_dict(targets["latency_ms"], feature_count=FEATURE_COUNT),
        ttft=None if ttft is None else Forest.from_dict(ttft, feature_count=FEATURE_COUNT),
        node_names=_names(document, "nodes", path),
        model_names=_names(document, "models", path),
        info={key: document[key] for key in _INFO_KEYS if key in document},
    )


_INFO_KEYS = ("sklearn_version", "sollol_version", "trained_at", "data_span", "metrics", "params")


def _check_header(document: dict[str, Any], path: Path) -> None:
    if document.get("format") != ARTIFACT_FORMAT:
        raise ModelArtifactError(
            f"{path} is not a SOLLOL latency model (format {document.get('format')!r})"
        )
    if document.get("format_version") != ARTIFACT_VERSION:
        raise ModelArtifactError(
            f"{path} has format version {document.get('format_version')!r}; this SOLLOL "
            f"reads version {ARTIFACT_VERSION}. Retrain with `sollol train`"
        )
    if document.get("feature_schema_version") != FEATURE_SCHEMA_VERSION:
        raise ModelArtifactError(
            f"{path} was trained on feature schema {document.get('feature_schema_version')!r}; "
            f"this SOLLOL builds schema {FEATURE_SCHEMA_VERSION}. Retrain with `sollol train`"
        )
    if document.get("features") != list(FEATURE_NAMES):
        raise ModelArtifactError(
            f"{path} lists features {document.get('features')!r}; expected {list(FEATURE_NAMES)}"
        )


def _names(document: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    names = document.get(key)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ModelArtifactError(f"{path}: {key} must be a list of strings")
    return tuple(names)

"""How the CLI shows results: one line each, JSONL, annotated images, and the manifest that
says which image a frame id came from."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import click


# --- manifest: which image a frame id came from -------------------------------------------------
def frame_path(source: Any, name: str) -> str | None:
    """The image file a frame was read from, for file-based sources (else None)."""
    kind = getattr(source, "kind", "")
    if kind == "image":
        return str(Path(source.path).resolve())
    if kind == "folder":
        return str((Path(source.path) / name).resolve())
    if kind == "dataset":
        for img in getattr(source, "images", ()):
            if img.image_path.name == name:
                return str(img.image_path.resolve())
    return None


def read_manifest(path: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise click.ClickException(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[str(row["frame_id"])] = row
        except (ValueError, KeyError, TypeError):
            raise click.ClickException(f"{path}:{n}: not a manifest row") from None
    return rows


# --- output of results -------------------------------------------------------------------------
def result_line(result: Any, name: str | None = None) -> str:
    head = f"{result.frame_id}  {result.source_id}" + (f"/{name}" if name else "")
    if result.error:
        status = f"ERROR {result.error}"
    else:
        status = "fallback (no box)" if result.fallback else "ok"
    boxes = "; ".join(f"{c!r} [{', '.join(f'{v:.1f}' for v in b)}]"
                      for c, b in zip(result.captions, result.boxes, strict=True))
    return f"{head}  {status}  {1000 * result.latency:.0f} ms  {boxes}"


@contextmanager
def jsonl(path: str | None) -> Iterator[TextIO | None]:
    if path is None:
        yield None
    elif path == "-":
        yield sys.stdout
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            yield fh


class Sink:
    """Where results go: stdout lines, a JSONL file, annotated images."""

    def __init__(self, jsonl: TextIO | None, annotate: Path | None,
                 manifest: dict[str, dict[str, Any]] | None = None) -> None:
        self.jsonl = jsonl
        self.annotate = annotate
        self.manifest = manifest or {}
        self.images: dict[str, bytes] = {}  # frame id -> image (publish --wait --annotate)
        self.count = 0

    def __call__(self, result: Any, name: str | None = None) -> None:
        from spotline.results.annotate import write_annotated

        self.count += 1
        row = self.manifest.get(result.frame_id, {})
        name = name or row.get("name")
        if self.jsonl is not None:
            out = result.as_json()
            if name:
                out["name"] = name
            self.jsonl.write(json.dumps(out) + "\n")
            self.jsonl.flush()
        if self.jsonl is not sys.stdout:
            click.echo(result_line(result, name))
        if self.annotate is None:
            return
        image = self.images.pop(result.frame_id, None)
        if image is None and row.get("path"):
            try:
                image = Path(row["path"]).read_bytes()
            except OSError as exc:
                click.echo(f"  cannot annotate {result.frame_id}: {exc}", err=True)
        if image is not None:
            stem = f"{result.source_id}_{Path(name).stem}" if name else result.frame_id
            write_annotated(image, result, self.annotate, stem)

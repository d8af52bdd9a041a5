"""Where exports live and which checkpoint they came from.

Exports of a checkpoint are written beside it, in ``<name>.export/`` (``detector.pt.export/``,
``scorer.export/``), with a ``manifest.json`` that records the source's sha256 (of the file, or
of every file of a directory). A stage refuses an export whose recorded hash is not that of the
checkpoint it would otherwise load: a stale export never runs silently."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...common.errors import ModelError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KINDS = ("detector", "scorer", "upscaler")
PRECISIONS = ("fp32", "fp16", "int8")
_CHUNK = 1 << 22


def export_dir(source: Path | str) -> Path:
    """The folder beside ``source`` that holds its exports."""
    source = Path(source)
    return source.with_name(source.name + ".export")


def source_hash(source: Path | str) -> str:
    """sha256 of a checkpoint file, or of a directory's files (relative names and contents, in
    sorted order; hidden files and folders are left out)."""
    source = Path(source)
    digest = hashlib.sha256()
    if source.is_file():
        _feed(digest, source)
        return digest.hexdigest()
    if not source.is_dir():
        raise ModelError(f"checkpoint {source} does not exist")
    files = sorted(p for p in source.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(source).parts))
    for path in files:
        digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        _feed(digest, path)
    return digest.hexdigest()


def _feed(digest: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)


@dataclass
class Manifest:
    """What ``manifest.json`` says: the source, its hash and the exported files."""

    kind: str
    source: str
    sha256: str
    # "onnx-fp32" -> {"path": file} ({"vision": file, "text": file} for SigLIP's two towers),
    # file names relative to the export folder
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def key(self, engine: str, precision: str) -> str:
        return f"{engine}-{precision}"

    def has(self, engine: str, precision: str) -> bool:
        return self.key(engine, precision) in self.files

    def path(self, directory: Path, engine: str, precision: str, part: str = "path") -> Path:
        """The exported file of one engine and precision (``part``: vision or text for SigLIP)."""
        entry = self.files.get(self.key(engine, precision))
        if entry is None or part not in entry:
            have = ", ".join(sorted(self.files)) or "none"
            raise ModelError(f"{directory} has no {engine} {precision} export of {self.source} "
                             f"(it has: {have}); run `spotline export --engine {engine} "
                             f"--precision {precision}`")
        return directory / entry[part]

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "kind": self.kind, "source": self.source,
                           "sha256": self.sha256, "files": self.files, "meta": self.meta},
                          indent=2, sort_keys=True)


def read_manifest(directory: Path) -> Manifest:
    """The manifest of an export folder; ModelError when it is missing or unreadable."""
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest(kind=str(data["kind"]), source=str(data["source"]),
                            sha256=str(data["sha256"]), files=dict(data.get("files", {})),
                            meta=dict(data.get("meta", {})), version=int(data["version"]))
    except FileNotFoundError:
        raise ModelError(f"{directory} has no {MANIFEST}; run `spotline export`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is unreadable ({type(exc).__name__}: {exc}); run "
                         f"`spotline export` again") from None
    if manifest.version != FORMAT_VERSION:
        raise ModelError(f"{path} has format version {manifest.version}, this spotline reads "
                         f"{FORMAT_VERSION}; run `spotline export` again")
    return manifest


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write the manifest atomically (a reader never sees half of it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def has_exports(source: Path | str) -> bool:
    """Whether ``source`` has an export folder with a manifest (not yet checked for staleness)."""
    return (export_dir(source) / MANIFEST).is_file()


def verified_manifest(source: Path | str, kind: str) -> tuple[Path, Manifest]:
    """(export folder, manifest) of ``source``, after checking that the export was made from
    this very checkpoint; ModelError names both hashes when it was not."""
    source = Path(source)
    directory = export_dir(source)
    manifest = read_manifest(directory)
    if manifest.kind != kind:
        raise ModelError(f"{directory} holds a {manifest.kind} export, not a {kind}")
    current = source_hash(source)
    if current != manifest.sha256:
        raise ModelError(
            f"stale export: {directory} was exported from a checkpoint with sha256 "
            f"{manifest.sha256[:16]}…, but {source} now has sha256 {current[:16]}…; "
            f"run `spotline export` again (or choose backend=torch)")
    return directory, manifest

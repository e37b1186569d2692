"""Keeping scikit-build-core's build directories across pip's isolated builds (see
build_backend.py): no dependency beyond the standard library, so that tests import it."""

from __future__ import annotations

import json
from pathlib import Path


def gone_root(path):
    """The topmost ancestor of `path` that no longer exists (a deleted environment), or
    None if `path` exists."""
    path = Path(path)
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def drop_entries(cache_text, needle):
    """The CMake cache without the entries whose line holds `needle`, each with the
    "//" help lines above it (CMake refuses help lines without their entry)."""
    out, help_lines = [], []
    for line in cache_text.splitlines(keepends=True):
        if line.startswith("//"):
            help_lines.append(line)
            continue
        if needle not in line:
            out += help_lines
            out.append(line)
        help_lines = []
    return "".join(out + help_lines)


def adopt_build_dirs(source_dir, version, skbuild_dir):
    """Re-home the build directories under `source_dir`/build whose record names a
    scikit-build-core `version` that ran from an environment deleted since: record
    `skbuild_dir` instead and drop the cache entries that point into the deleted one.
    Returns the directories changed."""
    adopted = []
    for record in sorted(Path(source_dir, "build").glob("*/.skbuild-info.json")):
        try:
            info = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("skbuild_version") != version:
            continue
        gone = gone_root(info.get("skbuild_path") or ".")
        if gone is None:
            continue
        cache = record.parent / "CMakeCache.txt"
        if cache.is_file():
            text = cache.read_text(encoding="utf-8")
            cache.write_text(drop_entries(text, str(gone)), encoding="utf-8")
        info["skbuild_path"] = str(skbuild_dir)
        record.write_text(json.dumps(info, indent=2), encoding="utf-8")
        adopted.append(record.parent)
    return adopted

"""Local destinations of downloaded objects: a remote key becomes a path inside its download root, or nothing.

Object stores allow any key, ``../`` included: a key ``models/x/../../../home/me/.bashrc`` listed under
``models/x`` would, joined naively onto a download directory, write outside it. Every download into a local
directory (checkpoint copies, weight downloads) names its files through `destination`, which resolves the
path and refuses one that leaves the root.
"""

from __future__ import annotations

from pathlib import Path


class UnsafeDestinationError(ValueError):
    """A remote key would be written outside the local directory it is downloaded into."""


def destination(root: Path, relative: str, source: str | None = None) -> Path:
    """The resolved local path of ``relative`` (a key relative to the remote directory being downloaded)
    under ``root``; `UnsafeDestinationError` when it resolves to ``root`` itself or outside it.
    ``source`` names the remote object in the message."""
    base = Path(root).resolve()
    target = (base / relative.lstrip("/")).resolve()
    if base not in target.parents:
        raise UnsafeDestinationError(
            f"refusing to download {source or relative!r} to {target}: expected a path inside {base} "
            f"(the key's relative part {relative!r} leaves it)"
        )
    return target

"""Reading what edit runs committed under a DST: the manifest (one row per output) and the written prompts."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from pipelines.schema import MANIFEST_DIR, MANIFEST_SCHEMA, PROMPTS_DIR, PROMPTS_SCHEMA, TableStore

logger = logging.getLogger(__name__)


def read_manifest(dst: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Every committed manifest row under ``dst`` (MANIFEST_SCHEMA), one per edit key (the last)."""
    table = TableStore(dst, storage_options).read_all(MANIFEST_DIR, MANIFEST_SCHEMA)
    keys = table.column("edit_key").to_pylist()
    last = {k: i for i, k in enumerate(keys)}
    if len(last) != len(keys):
        logger.warning("%s: %d duplicate manifest rows ignored", dst, len(keys) - len(last))
        table = table.take(sorted(last.values()))
    return table


def read_prompts(dst: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Every committed prompt row under ``dst`` (PROMPTS_SCHEMA)."""
    return TableStore(dst, storage_options).read_all(PROMPTS_DIR, PROMPTS_SCHEMA)


def committed_prompts(
    dst: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """clip id -> its committed prompt rows, by prompt index (first row of each index wins)."""
    by_clip: dict[str, dict[int, dict[str, Any]]] = {}
    for row in read_prompts(dst, storage_options).to_pylist():
        by_clip.setdefault(row["clip_id"], {}).setdefault(int(row["prompt_index"]), row)
    return {c: [rows[i] for i in sorted(rows)] for c, rows in by_clip.items()}

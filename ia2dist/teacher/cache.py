"""On-disk teacher cache: one safetensors file of records plus a manifest written last.

A cache directory counts only when ``manifest.json`` exists; it is written after the tensor file with
an atomic rename and records the file's sha256, so a partially written or tampered cache is refused
instead of being read. Tensors are stored with safetensors (no pickle, cannot run code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ia2dist.errors import IA2Error
from ia2dist.io import sha256_file, write_json_atomic
from ia2dist.records import ACTIVATION_SCHEMA_VERSION, TeacherRecord

TENSORS_FILE = "records.safetensors"
MANIFEST_FILE = "manifest.json"


def save_records(cache_dir: Path, records: list[TeacherRecord], meta: dict) -> None:
    """Persist ``records`` (order kept) with ``meta`` (what determined them) into ``cache_dir``."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MANIFEST_FILE).unlink(missing_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for i, rec in enumerate(records):
        tensors[f"{i}.response_ids"] = rec.response_ids.to(torch.int64).contiguous()
        tensors[f"{i}.acts"] = rec.acts_LTD.contiguous()
        if rec.topk_ids_Tk is not None:
            tensors[f"{i}.topk_ids"] = rec.topk_ids_Tk.to(torch.int64).contiguous()
            tensors[f"{i}.topk_logprobs"] = rec.topk_logprobs_Tk.float().contiguous()
    tmp = cache_dir / f".{TENSORS_FILE}.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, cache_dir / TENSORS_FILE)
    manifest = {
        "schema_version": ACTIVATION_SCHEMA_VERSION,
        "num_records": len(records),
        "uids": [r.uid for r in records],
        "act_bytes": sum(r.nbytes() for r in records),
        "sha256": sha256_file(cache_dir / TENSORS_FILE),
        "meta": meta,
    }
    write_json_atomic(cache_dir / MANIFEST_FILE, manifest)


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IA2Error(f"{path}: corrupt manifest ({exc}); delete {cache_dir} to re-extract") from None


def load_records(cache_dir: Path, expected_meta: dict | None = None) -> list[TeacherRecord] | None:
    """Records from a complete cache, or None when there is none. A cache whose schema, meta or
    checksum does not match raises IA2Error (it is never silently reused)."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        return None
    if manifest.get("schema_version") != ACTIVATION_SCHEMA_VERSION:
        raise IA2Error(f"{cache_dir}: teacher cache schema {manifest.get('schema_version')} != "
                       f"{ACTIVATION_SCHEMA_VERSION}; delete the directory to re-extract")
    if expected_meta is not None and manifest.get("meta") != json.loads(json.dumps(expected_meta)):
        raise IA2Error(f"{cache_dir}: teacher cache was made with different settings; "
                       "use another run_dir or pass --overwrite")
    path = cache_dir / TENSORS_FILE
    if not path.is_file() or sha256_file(path) != manifest.get("sha256"):
        raise IA2Error(f"{path}: checksum does not match the manifest (partial or modified file); "
                       f"delete {cache_dir} to re-extract")
    tensors = load_file(str(path))
    records = []
    for i, uid in enumerate(manifest["uids"]):
        records.append(TeacherRecord(
            uid=uid,
            response_ids=tensors[f"{i}.response_ids"],
            acts_LTD=tensors[f"{i}.acts"],
            topk_ids_Tk=tensors.get(f"{i}.topk_ids"),
            topk_logprobs_Tk=tensors.get(f"{i}.topk_logprobs"),
        ))
    return records

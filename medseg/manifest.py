"""The data manifest: one row per patient (case) with its canonical image, label and split.

``data_manifests/<dataset>.tsv`` columns: ``patient_id, subject_id, image, label, split, modality``.
``patient_id`` names one case (a study) and every file derived from it; ``subject_id`` is the person, so that all
studies of one person fall into the same split. ``split`` is ``train``, ``val``, ``test``, or ``unlabelled`` (no label).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.config import SplitConfig
from medseg.errors import ManifestError
from medseg.io import file_sha256, read_tsv

MANIFEST_COLUMNS = ["patient_id", "subject_id", "image", "label", "split", "modality"]
OPTIONAL_COLUMNS = {"modality"}  # manifests written before it existed read as modality ""
SPLITS = ("train", "val", "test", "unlabelled")


@dataclass(frozen=True)
class Entry:
    patient_id: str
    subject_id: str
    image: Path
    label: Path | None
    split: str
    modality: str = ""  # CT, MR, ...; "" when the input did not say


def assign_splits(rows: list[dict[str, str]], split: SplitConfig) -> None:
    """Set ``row['split']`` in place, deterministically from the subjects and ``split.seed``.

    Subjects are sorted (their ids are keyed hashes, so the order carries nothing), shuffled with the seed, and
    cut into test, val and train. With three or more labelled subjects, a non-zero fraction gets at least one.
    """
    subjects = sorted({r["subject_id"] for r in rows if r["label"]})
    order = np.random.default_rng(split.seed).permutation(len(subjects))
    shuffled = [subjects[i] for i in order]
    n = len(shuffled)

    def count(fraction: float) -> int:
        k = round(fraction * n)
        return max(k, 1) if fraction > 0 and n >= 3 else k

    n_test, n_val = count(split.test_fraction), count(split.val_fraction)
    which = {s: "test" for s in shuffled[:n_test]}
    which.update({s: "val" for s in shuffled[n_test : n_test + n_val]})
    for row in rows:
        row["split"] = which.get(row["subject_id"], "train") if row["label"] else "unlabelled"


def read_manifest(path: str | Path) -> list[Entry]:
    """Read and check a manifest.

    Raises:
        ManifestError: missing file or columns, unknown split, duplicate ids.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist: run `medseg ingest` first")
    rows = read_tsv(path)
    missing = set(MANIFEST_COLUMNS) - OPTIONAL_COLUMNS - set(rows[0]) if rows else set()
    if missing:
        raise ManifestError(f"manifest {path} lacks columns {sorted(missing)}")
    entries, seen = [], set()
    for i, row in enumerate(rows, start=2):
        if row["split"] not in SPLITS:
            raise ManifestError(f"manifest {path} line {i}: unknown split '{row['split']}' (one of {SPLITS})")
        if row["patient_id"] in seen:
            raise ManifestError(f"manifest {path} line {i}: duplicate patient_id {row['patient_id']}")
        seen.add(row["patient_id"])
        label = Path(row["label"]) if row["label"] else None
        entries.append(
            Entry(
                row["patient_id"], row["subject_id"], Path(row["image"]), label, row["split"], row.get("modality") or ""
            )
        )
    return entries


def select(entries: list[Entry], *splits: str) -> list[Entry]:
    return [e for e in entries if e.split in splits]


def manifest_digest(path: str | Path) -> str:
    """SHA-256 (first 16 hex) of the manifest file: tags a training run with the exact data it saw."""
    return file_sha256(path)[:16]

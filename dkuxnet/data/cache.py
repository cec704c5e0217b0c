"""Lossless fast cache of LA-layout cases and the in-memory :class:`VolumeBank`.

Reading an LA case from its gzip h5 file takes ~0.2 s; a training run samples
thousands of crops, so every case is decoded once into uncompressed ``.npy`` files and kept in
memory as tensors. The cache is lossless:

* Real LA images have at most 256 distinct float32 values each (8-bit MRI, z-scored), so they are
  stored as uint8 codes plus a float32 value table; :func:`dequantize` reproduces the h5 array
  bit for bit.
* Volumes with more than 256 distinct values (the synthetic phantom is continuous) are stored as
  raw float32; nothing is rounded.

Layout of a cache folder: ``<ID>.image.npy`` (codes or raw), ``<ID>.table.npy`` (codes only),
``<ID>.label.npy`` and ``index.json``, which records per case the source path, size and mtime and
the storage kind; a case whose source changed is rebuilt. All files are written atomically (a
temporary name, then ``os.replace``). A warm load maps labels and raw images copy-on-write from the
cache files (no copy) and only materialises the float32 images of coded cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dkuxnet.data.la import case_path, read_case
from dkuxnet.data.resample import downsample_image, downsample_label
from dkuxnet.fileio import atomic_path, write_text_atomic

FORMAT = 1
INDEX = "index.json"
MAX_CODES = 256


def quantize(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Code an image with ≤ 256 distinct values as ``(codes uint8, table float32)``, losslessly.

    ``table`` is sorted ascending and ``table[codes] == image`` exactly. Fast path: values are
    bucketed by the upper 16 bits of their float32 pattern (a 65,536-entry lookup, ~20× faster
    than ``np.unique``); when two distinct values share a bucket, an exact ``np.unique`` is used.

    Raises:
        ValueError: the image has more than 256 distinct values (store it raw instead).
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    high = image.view(np.uint32) >> 16
    present = np.bincount(high.ravel(), minlength=1 << 16) > 0
    if present.sum() > MAX_CODES:  # more distinct buckets than codes: more distinct values too
        raise ValueError(f"image has more than {MAX_CODES} distinct values; uint8 codes cannot hold them")
    codes = (np.cumsum(present) - 1).astype(np.uint8)[high]
    table = np.zeros(int(present.sum()), dtype=np.float32)
    table[codes] = image
    if not np.array_equal(table[codes], image):
        table, inverse = np.unique(image, return_inverse=True)
        if table.size > MAX_CODES:
            raise ValueError(f"image has {table.size} distinct values; uint8 codes hold at most {MAX_CODES}")
        return inverse.reshape(image.shape).astype(np.uint8), table.astype(np.float32)
    order = np.argsort(table)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank.astype(np.uint8)[codes], table[order]


def dequantize(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize`: ``table[codes]`` as float32 with the shape of ``codes``."""
    return np.take(table.astype(np.float32, copy=False), codes)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def resolve_cache_dir(root: Path, cache_dir: Path | None = None) -> Path:
    """Cache folder for ``root``: ``cache_dir`` if given, else ``<root>/.dkuxnet_cache`` when
    writable, else ``~/.cache/dkuxnet/<first 16 hex of sha256(resolved root path)>``."""
    if cache_dir is not None:
        return Path(cache_dir)
    local = Path(root) / ".dkuxnet_cache"
    if _writable(local):
        return local
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "dkuxnet" / key


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _read_index(folder: Path) -> dict[str, Any]:
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index.get("cases", {}) if index.get("format") == FORMAT else {}


def _write_index(folder: Path, entries: dict[str, Any]) -> None:
    merged = {**_read_index(folder), **entries}  # keep what another process added meanwhile
    write_text_atomic(folder / INDEX, json.dumps({"format": FORMAT, "cases": merged}, indent=1))


def _source_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load_cached(folder: Path, case_id: str, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        label = np.load(folder / f"{case_id}.label.npy", mmap_mode="c")  # copy-on-write map
        stored = np.load(folder / f"{case_id}.image.npy", mmap_mode="c")
        if entry["kind"] == "codes":
            image = dequantize(stored, np.load(folder / f"{case_id}.table.npy"))
        else:
            image = stored
    except (OSError, ValueError, KeyError):
        return None
    if image.shape != label.shape or list(label.shape) != entry.get("shape"):
        return None
    return image, label


def _build(folder: Path, root: Path, case_id: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    image, label = read_case(root, case_id)
    try:
        codes, table = quantize(image)
        _save(folder / f"{case_id}.image.npy", codes)
        _save(folder / f"{case_id}.table.npy", table)
        kind = "codes"
    except ValueError:
        _save(folder / f"{case_id}.image.npy", image)
        kind = "raw"
    _save(folder / f"{case_id}.label.npy", label)
    return image, label, {"kind": kind, "shape": list(label.shape)}


@dataclass
class VolumeBank:
    """Cases held in memory as tensors, ready for :func:`dkuxnet.data.augment.sample_patches`.

    Attributes:
        ids: case IDs, in the order given to :meth:`load`.
        images: per case a float32 tensor 1×X×Y×Z.
        labels: per case a uint8 tensor X×Y×Z.
    """

    ids: list[str]
    images: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def device(self) -> torch.device:
        """Device of the tensors (CPU for an empty bank)."""
        return self.images[0].device if self.images else torch.device("cpu")

    def to(self, device: str | torch.device) -> VolumeBank:
        """A new bank with every tensor on ``device`` (tensors already there are shared, not copied)."""
        device = torch.device(device)
        return VolumeBank(
            ids=list(self.ids),
            images=[x.to(device) for x in self.images],
            labels=[y.to(device) for y in self.labels],
        )

    @classmethod
    def load(
        cls, root: Path, ids: list[str], cache_dir: Path | None = None, progress: bool = True, resample: int = 1
    ) -> VolumeBank:
        """Load cases through the on-disk cache, building missing or stale entries.

        With ``resample`` = f > 1 the bank holds only the downsampled volumes
        (:mod:`dkuxnet.data.resample`: mean-pooled images, majority-vote labels); the cache keeps the
        original ones.

        Args:
            root: LA-layout data folder.
            ids: case IDs to load (e.g. ``split.labeled + split.unlabeled``).
            cache_dir: cache folder; default :func:`resolve_cache_dir` (``<root>/.dkuxnet_cache``,
                or a user cache folder when ``root`` is read-only).
            progress: tqdm progress bar over cases.
            resample: integer downsampling factor (``data.resample``); 1 keeps the original grid.

        Raises:
            DataError: a case that has to be (re)built is missing or invalid.
        """
        root = Path(root)
        folder = resolve_cache_dir(root, cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        index = _read_index(folder)
        built: dict[str, Any] = {}
        images, labels = [], []
        for case_id in tqdm(ids, desc="loading cases", unit="case", disable=not progress):
            path, entry, pair = case_path(root, case_id), index.get(case_id), None
            if entry is not None and path.is_file() and _source_key(path).items() <= entry.items():
                pair = _load_cached(folder, case_id, entry)
            if pair is None:
                image, label, meta = _build(folder, root, case_id)  # DataError when path is bad
                built[case_id] = {**_source_key(path), **meta}
                pair = image, label
            images.append(downsample_image(pair[0], resample).unsqueeze(0))  # 1×X×Y×Z
            labels.append(downsample_label(pair[1], resample))  # X×Y×Z
        if built:
            _write_index(folder, built)
        return cls(ids=list(ids), images=images, labels=labels)

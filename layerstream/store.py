"""The layer store: manifest.json + one safetensors file per unit.

Every file is written to a temporary name, fsynced and renamed; the manifest is written last, so a
directory with a manifest is a complete store. Unit files are checked against the manifest (size
always, xxh3 of the content on first read, sha256 on `verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import xxhash

from .errors import StoreError

FORMAT = "layerstream-store"
VERSION = 1
MANIFEST = "manifest.json"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class UnitInfo:
    """One unit of the store: what it holds and how to check its file."""

    name: str          # "embed", "layer.0", ..., "head"
    kind: str          # "embed" | "layer" | "head"
    file: str          # relative to the store
    bytes: int
    sha256: str
    xxh3: str
    tensors: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    architecture: str
    model_type: str
    dtype: str
    source: dict
    units: list[UnitInfo]
    tied: dict[str, str] = field(default_factory=dict)
    quantization: str | None = None
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["units"] = [UnitInfo(**u) for u in d["units"]]
        return cls(**d)

    @property
    def total_bytes(self) -> int:
        return sum(u.bytes for u in self.units)


# ---------------------------------------------------------------------------- safe writing

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_digests(path: Path, chunk: int = 16 << 20) -> tuple[str, str]:
    """(sha256, xxh3_64) of a file, read once."""
    sha, xx = hashlib.sha256(), xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            xx.update(block)
    return sha.hexdigest(), xx.hexdigest()


# ---------------------------------------------------------------------------- reading units

@dataclass
class TensorSlot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int   # offset from the start of the file
    end: int


def read_header(path: Path) -> tuple[list[TensorSlot], int]:
    """Parse a safetensors header: tensor slots (file offsets) and the file size it implies."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: not a readable safetensors unit file ({e}); "
                         f"run `layerstream verify` on the store or split it again") from None
    base = 8 + n
    slots, end = [], base
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        if info["dtype"] not in DTYPES:
            raise StoreError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        slots.append(TensorSlot(name, DTYPES[info["dtype"]], tuple(info["shape"]), base + b, base + e))
        end = max(end, base + e)
    return slots, end


def tensor_views(buf: torch.Tensor, slots: list[TensorSlot], offset: int = 0) -> dict[str, torch.Tensor]:
    """Views into a flat uint8 buffer holding a unit file at `offset`: no copies."""
    out = {}
    for s in slots:
        t = buf[offset + s.begin: offset + s.end]
        out[s.name] = t.view(s.dtype).view(s.shape) if s.shape else t.view(s.dtype)[0]
    return out


class Store:
    """An opened store: manifest, paths, per-unit headers."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{self.path}: no {MANIFEST}; this is not a complete layerstream store "
                             f"(an interrupted split resumes with `layerstream split SRC {self.path}`)")
        try:
            d = json.loads(mpath.read_text())
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}")
            if d.get("version") != VERSION:
                raise ValueError(f"store version {d.get('version')} but this layerstream reads version {VERSION}")
            self.manifest = Manifest.from_dict(d)
        except (ValueError, TypeError, KeyError) as e:
            raise StoreError(f"{mpath}: damaged or foreign manifest ({e}); split the model again") from None
        self.units = {u.name: u for u in self.manifest.units}
        self._headers: dict[str, tuple[list[TensorSlot], int]] = {}

    @staticmethod
    def is_store(path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    def file(self, unit: str) -> Path:
        return self.path / self.units[unit].file

    def check_files(self) -> None:
        """Cheap check at open: every unit file exists with the size the manifest records."""
        for u in self.manifest.units:
            p = self.path / u.file
            try:
                size = p.stat().st_size
            except OSError:
                raise StoreError(f"{p}: unit file missing; re-split the model (`layerstream split`)") from None
            if size != u.bytes:
                raise StoreError(f"{p}: size {size} bytes, manifest says {u.bytes} (truncated or replaced); "
                                 f"run `layerstream verify {self.path}` and re-split the model")

    def slots(self, unit: str) -> list[TensorSlot]:
        if unit not in self._headers:
            slots, end = read_header(self.file(unit))
            u = self.units[unit]
            if end != u.bytes:
                raise StoreError(f"{self.file(unit)}: header describes {end} bytes, manifest says {u.bytes}; "
                                 f"the file is damaged or foreign: re-split the model")
            if sorted(s.name for s in slots) != sorted(u.tensors):
                raise StoreError(f"{self.file(unit)}: holds tensors that are not unit {unit}'s (a foreign file); "
                                 f"re-split the model")
            self._headers[unit] = (slots, end)
        return self._headers[unit][0]

    def check_content(self, unit: str, data) -> None:
        """xxh3 of a unit's bytes (a buffer already read) against the manifest."""
        got = xxhash.xxh3_64_hexdigest(data)
        if got != self.units[unit].xxh3:
            raise StoreError(f"{self.file(unit)}: content checksum mismatch (altered or foreign file); "
                             f"run `layerstream verify {self.path}` and re-split the model")

    def verify(self, progress=None) -> list[str]:
        """Full check (sha256 of every file). Returns a list of problems, empty when the store is sound."""
        problems = []
        for u in self.manifest.units:
            p = self.path / u.file
            if not p.is_file():
                problems.append(f"{p}: missing")
                continue
            if p.stat().st_size != u.bytes:
                problems.append(f"{p}: size {p.stat().st_size}, expected {u.bytes}")
                if progress:
                    progress(u.bytes)
                continue
            sha, _ = file_digests(p)
            if sha != u.sha256:
                problems.append(f"{p}: sha256 mismatch (altered or foreign file)")
            if progress:
                progress(u.bytes)
        return problems

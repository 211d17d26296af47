"""The layer store: manifest.json + one safetensors file per unit, or, in place, a manifest whose
units point at byte ranges of the source's own safetensors shards (no second copy of the model).

Every file is written to a temporary name, fsynced and renamed; the manifest is written last, so a
directory with a manifest is a complete store. Unit bytes are checked against the manifest (size
always, xxh3 of the content on first read, sha256 or xxh3 on `verify`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import xxhash

from ..errors import StoreError
from .io import TensorSlot, UnitLayout, file_digests, in_place_slots, layout_xxh3, make_layout, read_header

FORMAT = "layerstream-store"
VERSION = 1
MANIFEST = "manifest.json"


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
    # in place: byte ranges [file, begin, end) of source shards, and each tensor's slot as
    # [dtype, shape, range index, begin, end] (offsets inside its range), or, for a tensor made of pieces
    # laid end to end (an expert's gate and up weights, stored apart in the checkpoint), as
    # [dtype, shape, [[range index, begin, end], ...]]
    ranges: list | None = None
    slots: dict | None = None


@dataclass
class Manifest:
    architecture: str
    model_type: str
    dtype: str
    source: dict
    units: list[UnitInfo]
    tied: dict[str, str] = field(default_factory=dict)
    quantization: str | None = None
    in_place: bool = False
    source_files: dict[str, list[int]] = field(default_factory=dict)   # in place: path -> [size, mtime_ns]
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


class Store:
    """An opened store: manifest, paths, per-unit layouts."""

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
        self._layouts: dict[str, UnitLayout] = {}

    @staticmethod
    def is_store(path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    def file(self, unit: str) -> Path:
        """The file holding a unit (in place: its first range's shard)."""
        u = self.units[unit]
        return Path(u.ranges[0][0]) if u.ranges else self.path / u.file

    def check_files(self) -> None:
        """Cheap check at open: every file exists with the size (in place: and mtime) the manifest records."""
        if self.manifest.in_place:
            for f, (size, mtime) in self.manifest.source_files.items():
                try:
                    st = os.stat(f)
                except OSError:
                    raise StoreError(f"{f}: source file of this in-place store is missing; restore it or index "
                                     f"the model again (`layerstream split --in-place SRC {self.path}`)") from None
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    raise StoreError(f"{f}: source file changed since it was indexed (size or mtime); index the "
                                     f"model again (`layerstream split --in-place SRC {self.path}`)")
            return
        for u in self.manifest.units:
            p = self.path / u.file
            try:
                size = p.stat().st_size
            except OSError:
                raise StoreError(f"{p}: unit file missing; re-split the model (`layerstream split`)") from None
            if size != u.bytes:
                raise StoreError(f"{p}: size {size} bytes, manifest says {u.bytes} (truncated or replaced); "
                                 f"run `layerstream verify {self.path}` and re-split the model")

    def layout(self, unit: str) -> UnitLayout:
        if unit not in self._layouts:
            u = self.units[unit]
            ranges = self.ranges(unit)
            if u.ranges:
                slots = in_place_slots(u.slots)
            else:
                found, end = read_header(self.file(unit))
                if end != u.bytes:
                    raise StoreError(f"{self.file(unit)}: header describes {end} bytes, manifest says {u.bytes}; "
                                     f"the file is damaged or foreign: re-split the model")
                if sorted(s.name for s in found) != sorted(u.tensors):
                    raise StoreError(f"{self.file(unit)}: holds tensors that are not unit {unit}'s (a foreign "
                                     f"file); re-split the model")
                slots = [(s, 0) for s in found]
            self._layouts[unit] = make_layout(ranges, slots)
        return self._layouts[unit]

    def slots(self, unit: str) -> list[TensorSlot]:
        return self.layout(unit).slots

    def where(self, unit: str) -> str:
        u = self.units[unit]
        return f"{self.file(unit)}" + (f" (bytes {u.ranges[0][1]}.., unit {unit})" if u.ranges else "")

    def check_content(self, unit: str, buf: torch.Tensor) -> None:
        """xxh3 of a unit's bytes (a load buffer already filled) against the manifest."""
        if layout_xxh3(self.layout(unit), buf) != self.units[unit].xxh3:
            raise StoreError(f"{self.where(unit)}: content checksum mismatch (altered or foreign file); "
                             f"run `layerstream verify {self.path}` and re-split the model")

    def check_streaming(self, unit: str, chunk: int = 16 << 20) -> None:
        """xxh3 of a unit read in chunks (for a unit too large to hold whole just to check it)."""
        xx = xxhash.xxh3_64()
        buf = bytearray(chunk)
        for path, b, e in self.ranges(unit):
            try:
                with open(path, "rb", buffering=0) as f:
                    f.seek(b)
                    left = e - b
                    while left:
                        n = f.readinto(memoryview(buf)[:min(chunk, left)])
                        if not n:
                            break
                        xx.update(memoryview(buf)[:n])
                        left -= n
            except OSError as err:
                raise StoreError(f"{path}: cannot read unit {unit} ({err.strerror})") from None
        if xx.hexdigest() != self.units[unit].xxh3:
            raise StoreError(f"{self.where(unit)}: content checksum mismatch (altered or foreign file); "
                             f"run `layerstream verify {self.path}` and re-split the model")

    def ranges(self, unit: str) -> list[tuple[Path, int, int]]:
        u = self.units[unit]
        return [(Path(f), b, e) for f, b, e in u.ranges] if u.ranges else [(self.path / u.file, 0, u.bytes)]

    def verify(self, progress=None) -> list[str]:
        """Full check (sha256 of every unit file; in place: xxh3 of every range). Returns the problems found."""
        problems = []
        for u in self.manifest.units:
            if u.ranges:
                try:
                    self.check_streaming(u.name)
                except StoreError as e:
                    problems.append(str(e))
                if progress:
                    progress(u.bytes)
                continue
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

"""The layer store: manifest.json + one safetensors file per unit, or, in place, a manifest whose
units point at byte ranges of the source's own safetensors shards (no second copy of the model).

Every file is written to a temporary name, fsynced and renamed; the manifest is written last, so a
directory with a manifest is a complete store. Unit bytes are checked against the manifest (size
always, xxh3 of the content on first read; `verify` makes every check a load makes, on every unit).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import xxhash

from ..errors import StoreError
from .io import TensorSlot, UnitLayout, in_place_slots, layout_xxh3, make_layout, read_header

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


# a manifest's fields and the JSON types each must have (None: null allowed)
_FIELDS = {"architecture": (str,), "model_type": (str,), "dtype": (str,), "source": (dict,), "units": (list,),
           "tied": (dict,), "quantization": (str, type(None)), "in_place": (bool,), "source_files": (dict,),
           "format": (str,), "version": (int,)}
_UNIT_FIELDS = {"name": (str,), "kind": (str,), "file": (str,), "bytes": (int,), "sha256": (str,), "xxh3": (str,),
                "tensors": (list,), "ranges": (list, type(None)), "slots": (dict, type(None))}
_UNIT_NAME = re.compile(r"embed|head|layer\.(\d+)(\.expert\.(\d+))?")


def _is_int(x) -> bool:
    return type(x) is int and x >= 0


def _inside(path: str, folder: Path) -> bool:
    """Whether `path` lies in `folder` as written (no `..`; symlinks are not followed: a model directory of the
    hub's cache holds links into its blob folder)."""
    p, f = os.path.abspath(path), os.path.abspath(folder)
    return ".." not in Path(path).parts and os.path.commonpath([p, f]) == f


def check_manifest(d, store: Path) -> Manifest:
    """A manifest's JSON checked before anything in it is used: its shape (each field of its type), its units
    (each once: embed, layers 0..n-1, their experts 0..e-1, head; `Store.check_units` compares them with the
    model's own), each unit's file inside the store (none outside it, by `..`, an absolute path or a symlink),
    an in-place unit's byte ranges in the source files it records and its tensors inside them. Raises
    ValueError saying what is wrong."""
    if not isinstance(d, dict):
        raise ValueError(f"a JSON {type(d).__name__}, not an object")
    if d.get("format") != FORMAT:
        raise ValueError(f"format is {d.get('format')!r}")
    if d.get("version") != VERSION:
        raise ValueError(f"store version {d.get('version')} but this layerstream reads version {VERSION}")
    for k, types in _FIELDS.items():
        if k not in d and k in ("tied", "quantization", "in_place", "source_files"):
            continue
        if not isinstance(d.get(k), types) or (bool not in types and isinstance(d.get(k), bool)):
            got = "missing" if k not in d else f"a {type(d[k]).__name__}, not {types[0].__name__}"
            raise ValueError(f"{k} is {got}")
    if set(d) - set(_FIELDS):
        raise ValueError(f"unknown fields {sorted(set(d) - set(_FIELDS))}")
    if not isinstance(getattr(torch, d["dtype"], None), torch.dtype):
        raise ValueError(f"dtype {d['dtype']!r} is not a torch dtype")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in d.get("tied", {}).items()):
        raise ValueError("tied is not an object of names")
    files = d.get("source_files", {})
    if not all(isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v) for v in files.values()):
        raise ValueError("source_files is not an object of [size, mtime]")
    if not d["units"]:
        raise ValueError("it lists no units")
    where = [Path(str(d["source"].get("path", "")))]
    where.append(where[0].parent if d["source"].get("kind") == "gguf" else where[0])
    for f in files:
        if not (_inside(f, store) or _inside(f, where[1])):
            raise ValueError(f"source file {f} is outside the store and the model's directory")
    names, layers, experts = set(), set(), {}
    for u in d["units"]:
        if not isinstance(u, dict):
            raise ValueError(f"a unit is a {type(u).__name__}, not an object")
        for k, types in _UNIT_FIELDS.items():
            if k not in u and k in ("ranges", "slots"):
                continue
            if not isinstance(u.get(k), types) or isinstance(u.get(k), bool):
                raise ValueError(f"a unit's {k} is {'missing' if k not in u else type(u[k]).__name__}")
        if set(u) - set(_UNIT_FIELDS):
            raise ValueError(f"a unit has unknown fields {sorted(set(u) - set(_UNIT_FIELDS))}")
        name = u["name"]
        m = _UNIT_NAME.fullmatch(name)
        kind = None if m is None else name if name in ("embed", "head") else "expert" if m[3] else "layer"
        if kind is None or u["kind"] != kind or name in names:
            raise ValueError(f"unit {name!r} ({u['kind']!r}) is not a unit name and kind, or appears twice")
        names.add(name)
        if kind == "layer":
            layers.add(int(m[1]))
        elif kind == "expert":
            experts.setdefault(int(m[1]), set()).add(int(m[3]))
        if not _is_int(u["bytes"]) or not u["tensors"] or not all(isinstance(t, str) for t in u["tensors"]):
            raise ValueError(f"unit {name}'s bytes or tensors are malformed")
        if bool(u.get("ranges")) != bool(d.get("in_place")):
            raise ValueError(f"unit {name} {'lacks' if d.get('in_place') else 'has'} the byte ranges of an "
                             f"in-place store")
        if u.get("ranges"):
            _check_in_place_unit(u, files)
        else:
            p = Path(u["file"])
            if not u["file"] or p.is_absolute() or ".." in p.parts or \
                    not (store / p).resolve().is_relative_to(store.resolve()):
                raise ValueError(f"unit {name}'s file {u['file']!r} is outside the store")
    if "embed" not in names or "head" not in names:
        raise ValueError(f"it lacks the {'embed' if 'embed' not in names else 'head'} unit")
    n = max(layers, default=-1) + 1
    if layers != set(range(n)):
        raise ValueError(f"it lists {len(layers)} layer units of {n} (layer.{min(set(range(n)) - layers)} is "
                         f"missing)")
    for i, js in experts.items():
        if i not in layers or js != set(range(len(js))):
            raise ValueError(f"the expert units of layer {i} are not experts 0..{len(js) - 1} of a layer")
    return Manifest.from_dict(d)


def _check_in_place_unit(u: dict, files: dict) -> None:
    """An in-place unit: ranges [file, begin, end) of the recorded source files, slots inside them."""
    from .io import DTYPES

    name, ranges = u["name"], u["ranges"]
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and _is_int(r[1]) and _is_int(r[2])
                and r[1] <= r[2] and r[0] in files and r[2] <= files[r[0]][0]):
            raise ValueError(f"unit {name} has a byte range {r!r} that is not inside a source file it records")
    if u["bytes"] != sum(e - b for _, b, e in ranges) or not isinstance(u.get("slots"), dict):
        raise ValueError(f"unit {name}'s bytes or slots do not match its ranges")

    def piece(p) -> int:
        if not (isinstance(p, list) and len(p) == 3 and all(_is_int(x) for x in p) and p[0] < len(ranges)
                and p[1] <= p[2] <= ranges[p[0]][2] - ranges[p[0]][1]):
            raise ValueError(f"unit {name} has a tensor piece {p!r} outside its ranges")
        return p[2] - p[1]

    for t, entry in u["slots"].items():
        ok = isinstance(entry, list) and len(entry) >= 3 and entry[0] in DTYPES and isinstance(entry[1], list) \
            and all(_is_int(x) for x in entry[1])
        if ok:
            numel = 1
            for x in entry[1]:
                numel *= x
            if len(entry) == 3:   # pieces
                ok = isinstance(entry[2], list) and bool(entry[2]) and \
                    sum(piece(p) for p in entry[2]) == numel * DTYPES[entry[0]].itemsize
            else:
                ok = len(entry) in (5, 6) and piece(entry[2:5]) == numel * DTYPES[entry[0]].itemsize and \
                    (len(entry) == 5 or entry[5] is None or _row_order(entry[5], entry[1]))
        if not ok:
            raise ValueError(f"unit {name}'s tensor {t} has a malformed slot {entry!r}")


def _row_order(order, shape: list) -> bool:
    """A slot's row order (`io.reorder_rows`): [a, b, c] with a * b * c rows, or a list of the rows."""
    rows = shape[0] if shape else 0
    if not rows or not isinstance(order, list) or not all(_is_int(x) for x in order):
        return False
    if len(order) == 3 and len(order) != rows:
        return order[0] * order[1] * order[2] == rows
    return len(order) == rows and all(x < rows for x in order)


class Store:
    """An opened store: manifest, paths, per-unit layouts."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{self.path}: no {MANIFEST}; this is not a complete layerstream store "
                             f"(an interrupted split resumes with `layerstream split SRC {self.path}`)")
        try:
            self.manifest = check_manifest(json.loads(mpath.read_text()), self.path)
        except OSError as e:
            raise StoreError(f"{mpath}: cannot be read ({e.strerror})") from None
        except (ValueError, RecursionError) as e:   # (not JSON, not UTF-8: ValueErrors too)
            why = str(e) if type(e) is ValueError else f"not JSON: {type(e).__name__}"
            raise StoreError(f"{mpath}: damaged or foreign manifest ({why}); delete the store and split the model "
                             f"again") from None
        self.units = {u.name: u for u in self.manifest.units}
        self._on_disk = {u.name: u.kind for u in self.manifest.units}   # (a view of some units keeps them all)
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
            self.check_unit_file(u.name)

    def check_units(self, lay) -> None:
        """The manifest's units are the model's (`lay`: the layout of the model its config builds, as a load
        builds it): each unit present, of its kind, and none besides."""
        want = {u.name: u.kind for u in lay.units}
        if want != self._on_disk:
            missing = [n for n in want if n not in self._on_disk]
            extra = [n for n in self._on_disk if n not in want]
            other = [n for n in want if n in self._on_disk and want[n] != self._on_disk[n]]
            why = (f"lacks unit {missing[0]}" if missing else f"has unit {extra[0]}, which the model does not have"
                   if extra else f"holds unit {other[0]} as a {self._on_disk[other[0]]}, not a {want[other[0]]}")
            raise StoreError(f"{self.path / MANIFEST}: {why} ({len(want)} units in the model of its config.json, "
                             f"{len(self._on_disk)} in the manifest); the store is damaged or foreign: delete it "
                             f"and split the model again")

    def model_layout(self):
        """The units of the model the store's config.json builds (on the meta device: no memory), as a load
        finds them."""
        from transformers import AutoConfig

        from ..arch import build_skeleton, layout

        try:
            config = AutoConfig.from_pretrained(self.path)
        except Exception as e:   # transformers' config classes refuse a field of the wrong type in many ways
            raise StoreError(f"{self.path}/config.json: cannot be read by transformers ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}); delete the store and split the model again") \
                from None
        return layout(build_skeleton(config, torch.float32, device="meta"))

    def check_unit_file(self, unit: str) -> None:
        """A split store's unit file exists with the size the manifest records."""
        u = self.units[unit]
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
        """Every check a load makes, on every unit, read whole: the manifest (checked when the store opened),
        its units against the model's, the files' sizes (in place: the source files' sizes and mtimes), each
        unit file's header against the manifest, the xxh3 of each unit's bytes. Returns the problems found
        (none: the store loads)."""
        try:
            self.check_units(self.model_layout())
        except StoreError as e:
            return [str(e)]
        problems = []
        if self.manifest.in_place:
            try:
                self.check_files()
            except StoreError as e:
                return [str(e)]
        for u in self.manifest.units:
            try:
                if not u.ranges:
                    self.check_unit_file(u.name)
                self.layout(u.name)
                self.check_streaming(u.name)
            except StoreError as e:
                problems.append(str(e))
            if progress:
                progress(u.bytes)
        return problems

"""Files are never trusted blindly: damaged, truncated or hostile GGUF files, safetensors checkpoints and
store manifests end in one LayerstreamError naming the file and what is wrong, before anything is read
or allocated from what they claim; a seeded fuzzer over GGUF and safetensors headers holds every case to
that (a clean error or a correct load, in bounded time and memory)."""

import json
import random
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest

from layerstream.errors import LayerstreamError, SourceError, StoreError
from layerstream.sources import open_source
from layerstream.store import Store, index_in_place, split
from layerstream.store.inplace import index_gguf

from conftest import make_model_dir

# a tiny Llama GGUF: one layer, hidden 64, a 512-token vocabulary, F32 / F16 / Q8_0 / Q4_0 weights
GGUF_TYPES = {"token_embd": "F32", "attn_q": "Q8_0", "attn_k": "F16", "attn_v": "Q4_0", "attn_output": "Q8_0",
              "ffn_gate": "Q8_0", "ffn_up": "F32", "ffn_down": "Q8_0"}
GGUF_DIMS = {"hidden": 64, "ff": 64, "heads": 2, "kv": 1, "head_dim": 32, "vocab": 512}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf_tiny import make_llama_gguf

    return make_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", GGUF_TYPES, layers=1, dims=GGUF_DIMS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("st") / "model", "llama", layers=1)


def _open_and_index(path: Path, out: Path) -> None:
    """What `layerstream split --in-place` (and a run of a model not yet indexed) does with a source: open it,
    index it in place; the store it makes must then pass verify."""
    src = open_source(path)
    out = (index_gguf if src.kind == "gguf" else index_in_place)(src, out, progress=False)
    assert Store(out).verify() == []


def _clean(path: Path, out: Path, name: str) -> str:
    """Open and index `path`: a correct store, or a LayerstreamError naming `name`; nothing else."""
    try:
        _open_and_index(path, out)
    except LayerstreamError as e:
        assert name in str(e), str(e)
        assert "\n" not in str(e), str(e)
        return "error"
    return "loaded"


# ---------------------------------------------------------------------------- safetensors

def _header(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(f: Path, header, data: bytes) -> None:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_a_truncated_checkpoint_is_refused_before_a_store_is_written(tiny_dir, tmp_path):
    """In-place indexing of a checkpoint whose data region is shorter than its header says: one error naming
    the file and the truncation, and no store (before, it was indexed and later blamed as 'altered')."""
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    f = src / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    with pytest.raises(SourceError, match=r"model\.safetensors: .*describes \d+ bytes but the file has \d+: "
                                          r"truncated\); .*download it again"):
        index_in_place(open_source(src), tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_an_index_naming_files_outside_the_model_directory_is_refused(tiny_dir, tmp_path, shard):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    header, _ = _header(src / "model.safetensors")
    wm = {k: "model.safetensors" for k in header if k != "__metadata__"}
    wm[next(iter(wm))] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (tmp_path / "outside.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(SourceError, match=r"index\.json: names the shard .* outside the model directory"):
        open_source(src)


@pytest.mark.parametrize("index, match", [
    ("[]", "no weight_map"), ('{"weight_map": []}', "no weight_map"), ('{"weight_map": {"a": 3}}', "no weight_map"),
    ("{", "not JSON"), ('{"weight_map": {"nope.weight": "model.safetensors"}}', "does not hold it"),
])
def test_a_malformed_index_is_one_error(tiny_dir, tmp_path, index, match):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    (src / "model.safetensors.index.json").write_text(index)
    with pytest.raises(SourceError, match=match) as e:
        open_source(src)
    assert "model.safetensors.index.json" in str(e.value)



@pytest.mark.parametrize("config", ["[]", "{", '{"model_type": 5}',
                                    '{"model_type": "llama", "num_hidden_layers": "x"}'])
def test_a_malformed_config_is_one_error(tiny_dir, tmp_path, config):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    (src / "config.json").write_text(config)
    with pytest.raises(SourceError, match=r"config\.json: cannot be read by transformers") as e:
        open_source(src)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["a/..", "../x", "org/x..y", "org/a b", "/etc/passwd", "a/b/c"])
def test_only_hub_ids_as_the_hub_spells_them_go_to_the_hub(name):
    from layerstream.sources import looks_like_hub_id

    assert not looks_like_hub_id(name)
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")

@pytest.mark.parametrize("edit, match", [
    (lambda h: h[_first(h)].update(data_offsets=[0, 1 << 62]), "span"),
    (lambda h: h[_first(h)].update(shape=[-1, 64]), "not a list of sizes"),
    (lambda h: h[_first(h)].update(dtype="C64"), "unsupported dtype C64"),
    (lambda h: h[_first(h)].update(data_offsets=[8, 4]), "not \\[begin, end\\]"),
    (lambda h: h.update({"extra": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), "overlap"),
    (lambda h: h[_first(h)].update(shape=list(reversed(h[_first(h)]["shape"]))), "needs"),
])
def test_a_damaged_safetensors_header_is_one_error(tiny_dir, tmp_path, edit, match):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    header, data = _header(src / "model.safetensors")
    edit(header)
    _write(src / "model.safetensors", header, data)
    with pytest.raises(SourceError, match=match) as e:
        _open_and_index(src, tmp_path / "store")
    assert "model.safetensors" in str(e.value)


def _first(h: dict) -> str:
    """The first tensor of a header whose shape is not square (so that reversing it changes it)."""
    return next(k for k, v in h.items() if k != "__metadata__" and len(set(v["shape"])) > 1)


def test_a_huge_header_length_reads_nothing(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 50 << 20) + b"{}")
    with pytest.raises(StoreError, match="header length 52428800 runs past the end of the file"):
        from layerstream.store.io import read_header

        read_header(f)


# ---------------------------------------------------------------------------- GGUF

def _gguf_offsets(path: Path) -> dict:
    """Where a GGUF's counts, metadata and tensor infos lie (from gguf-py's reader of the valid file)."""
    import gguf

    r = gguf.GGUFReader(path)
    kv = []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        klen = int(f.parts[0][0])
        vtype_at = f.offset + 8 + klen
        kv.append({"key": f.offset, "type": vtype_at,
                   "count": vtype_at + 8 if f.types[0] == gguf.GGUFValueType.ARRAY else None})
    tensors = []
    for t in r.tensors:
        at = t.field.offset + 8 + len(t.name)
        n = len(t.shape)
        tensors.append({"n_dims": at, "dims": [at + 4 + 8 * i for i in range(n)], "type": at + 4 + 8 * n,
                        "offset": at + 8 + 8 * n})
    return {"kv": kv, "tensors": tensors, "header_end": r.data_offset, "infos": r.tensors[0].field.offset}


@pytest.mark.parametrize("cut", [0, 3, 20, 100, 5000, -1000, -1])
def test_a_truncated_gguf_is_one_error(tiny_gguf, tmp_path, cut):
    f = tmp_path / "cut.gguf"
    raw = tiny_gguf.read_bytes()
    f.write_bytes(raw[:cut])
    with pytest.raises(SourceError, match=r"cut\.gguf: .*(truncated|shorter than a GGUF header)"):
        open_source(f)


@pytest.mark.parametrize("what, value, match", [
    ("tensor_count", (1 << 64) - 1, "more than its .* bytes can hold"),
    ("kv_count", 1 << 40, "more than its .* bytes can hold"),
    ("array_count", (1 << 63) + 5, "claims|runs past the end"),
    ("n_dims", 7, "dimensions"),
    ("dim", 1 << 62, "runs past the end|whole blocks"),
    ("type", 99, "type 99"),
    ("offset", (1 << 64) - 32, "runs past the end"),
])
def test_a_gguf_claiming_huge_sizes_is_refused_before_reading(tiny_gguf, tmp_path, what, value, match):
    """Counts, lengths, dims and offsets are checked against the file's size: no loop over a count of
    2^64 (gguf-py's reader would never end), no allocation of what a field claims."""
    at = _gguf_offsets(tiny_gguf)
    raw = bytearray(tiny_gguf.read_bytes())
    arrays = [k["count"] for k in at["kv"] if k["count"] is not None]
    pos, fmt = {"tensor_count": (8, "<Q"), "kv_count": (16, "<Q"), "array_count": (arrays[-1], "<Q"),
                "n_dims": (at["tensors"][0]["n_dims"], "<I"), "dim": (at["tensors"][0]["dims"][0], "<Q"),
                "type": (at["tensors"][0]["type"], "<I"), "offset": (at["tensors"][-1]["offset"], "<Q")}[what]
    struct.pack_into(fmt, raw, pos, value)
    f = tmp_path / "bad.gguf"
    f.write_bytes(bytes(raw))
    t0 = time.time()
    with pytest.raises(SourceError, match=match) as e:
        open_source(f)
    assert "bad.gguf" in str(e.value) and time.time() - t0 < 5


def test_gguf_metadata_larger_than_its_tensors_is_refused(tiny_gguf, tmp_path):
    """A layer count edited to a huge value (the file still parses) would build a model of that size."""
    import gguf

    at = next(f for f in gguf.GGUFReader(tiny_gguf).fields.values() if f.name == "llama.block_count")
    raw = bytearray(tiny_gguf.read_bytes())
    struct.pack_into("<I", raw, at.offset + 8 + len(at.name) + 4, 1 << 30)
    f = tmp_path / "layers.gguf"
    f.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match=r"layers\.gguf: its metadata says 1073741824 layers but it holds the "
                                          r"tensors of 1"):
        open_source(f)


# ---------------------------------------------------------------------------- store manifests

@pytest.fixture(scope="module")
def tiny_store(tiny_dir, tmp_path_factory):
    return split(tiny_dir, tmp_path_factory.mktemp("store") / "s", progress=False)


def _edited_store(tiny_store, tmp_path, edit) -> Path:
    out = tmp_path / "store"
    shutil.copytree(tiny_store, out)
    m = json.loads((out / "manifest.json").read_text())
    new = edit(m)   # a replacement, or None where it changed m
    m = m if new is None else new
    (out / "manifest.json").write_text(json.dumps(m) if not isinstance(m, str) else m)
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda m: [], "a JSON list, not an object"),
    (lambda m: {}, "format is None"),
    (lambda m: "{", "not JSON"),
    (lambda m: '"\\ud800' + "[" * 100000, "not JSON"),
    (lambda m: m.update(units="all"), "units is a str"),
    (lambda m: m.update(units=[]), "lists no units"),
    (lambda m: m["units"][1].update(name="layer.1"), "layer.0 is missing"),
    (lambda m: m["units"].pop(0) and None, "lacks the embed unit"),
    (lambda m: m["units"][1].update(bytes="12"), "bytes is str"),
    (lambda m: m["units"][1].update(kind="head"), "not a unit name and kind"),
    (lambda m: m["units"].append(m["units"][1]), "appears twice"),
    (lambda m: m.update(dtype="eval"), "not a torch dtype"),
    (lambda m: m["units"][1].pop("xxh3") and None, "xxh3 is missing"),
])
def test_a_malformed_manifest_is_one_store_error(tiny_store, tmp_path, edit, match):
    out = _edited_store(tiny_store, tmp_path, edit)
    with pytest.raises(StoreError, match=match) as e:
        Store(out)
    assert "manifest.json" in str(e.value) and "split the model again" in str(e.value)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_a_unit_file_outside_the_store_is_refused(tiny_store, tmp_path, where):
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(tiny_store / "units/layer.0.safetensors", outside)

    def edit(m):
        if where != "symlink":
            m["units"][1]["file"] = str(outside) if where == "absolute" else "../outside.safetensors"

    out = _edited_store(tiny_store, tmp_path, edit)
    if where == "symlink":
        (out / "units/layer.0.safetensors").unlink()
        (out / "units/layer.0.safetensors").symlink_to(outside)
    with pytest.raises(StoreError, match="unit layer.0's file .* is outside the store"):
        Store(out)


def test_an_in_place_range_outside_its_source_files_is_refused(tiny_dir, tmp_path):
    out = index_in_place(open_source(tiny_dir), tmp_path / "inplace", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    m["units"][1]["ranges"][0][0] = "/etc/passwd"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="byte range .* not inside a source file it records"):
        Store(out)
    m["source_files"]["/etc/passwd"] = [1, 1]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="source file /etc/passwd is outside the store and the model's directory"):
        Store(out)


# ---------------------------------------------------------------------------- the fuzzer

HUGE = [(1 << 64) - 1, 1 << 63, (1 << 63) - 1, 1 << 40, (1 << 32) - 1, 1 << 31]


def _gguf_cases(raw: bytes, at: dict, rng: random.Random, n: int):
    """(label, bytes) of `n` seeded mutations of a GGUF: truncations (half inside the header), byte flips and
    overwrites in the metadata and the tensor infos, counts, lengths, dims, types and offsets set to huge,
    negative (as two's complement) or off-by-a-little values."""
    end = at["header_end"]
    for i in range(n):
        b = bytearray(raw)
        kind = i % 6
        if kind == 0:
            cut = rng.randrange(0, end) if rng.random() < 0.5 else rng.randrange(end, len(raw))
            yield f"truncate@{cut}", bytes(b[:cut])
            continue
        if kind == 1:   # flips in the tensor infos, or anywhere in the header
            lo = at["infos"] if rng.random() < 0.6 else 0
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(lo, end)] ^= 1 << rng.randrange(8)
            yield "flip", bytes(b)
            continue
        if kind == 2:   # 8 bytes overwritten with a huge value, anywhere in the header
            pos = rng.randrange(0, end - 8)
            struct.pack_into("<Q", b, pos, rng.choice(HUGE))
            yield f"huge@{pos}", bytes(b)
            continue
        if kind == 3:   # a metadata field: its key length, its value type, an array's count
            kv = rng.choice(at["kv"])
            field = rng.choice(["key", "type"] + (["count"] * 2 if kv["count"] else []))
            fmt = "<I" if field == "type" else "<Q"
            value = rng.choice([rng.randrange(0, 16), rng.randrange(0, 1 << 8)] if field == "type" else
                               HUGE + [rng.randrange(0, 1 << 20)])
            struct.pack_into(fmt, b, kv[field], value)
            yield f"kv-{field}={value}", bytes(b)
            continue
        t = rng.choice(at["tensors"])   # a tensor info: its dimension count, a dim, its type, its offset
        field = rng.choice(["n_dims", "dims", "type", "offset"])
        if field == "n_dims":
            value = rng.choice([0, 1, 3, 5, (1 << 32) - 1])
            struct.pack_into("<I", b, t["n_dims"], value)
        elif field == "dims":
            value = rng.choice(HUGE + [0, 1, 31, rng.randrange(0, 1 << 16)])
            struct.pack_into("<Q", b, rng.choice(t["dims"]), value)
        elif field == "type":
            value = rng.randrange(0, 64)
            struct.pack_into("<I", b, t["type"], value)
        else:
            value = rng.choice(HUGE + [32, 1, rng.randrange(0, len(raw)) // 32 * 32])
            struct.pack_into("<Q", b, t["offset"], value)
        yield f"tensor-{field}={value}", bytes(b)


def _safetensors_cases(raw: bytes, rng: random.Random, n: int):
    """(label, bytes) of `n` seeded mutations of a safetensors file: truncations (half inside the header),
    the header length set to huge or slightly wrong values, byte flips in the header, and header edits: a
    tensor's dtype, shape or offsets changed (huge, negative, swapped, of another type), a key removed."""
    (hl,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hl])
    names = [k for k in header if k != "__metadata__"]
    data = raw[8 + hl:]
    for i in range(n):
        kind = i % 5
        if kind == 0:
            cut = rng.randrange(0, 8 + hl) if rng.random() < 0.5 else rng.randrange(8 + hl, len(raw))
            yield f"truncate@{cut}", raw[:cut]
        elif kind == 1:
            value = rng.choice(HUGE + [hl - 1, hl + 1, 0, len(raw), len(raw) - 8])
            yield f"length={value}", struct.pack("<Q", value) + raw[8:]
        elif kind == 2:
            b = bytearray(raw)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(8, 8 + hl)] ^= 1 << rng.randrange(8)
            yield "flip", bytes(b)
        else:
            h = json.loads(json.dumps(header))
            t = h[rng.choice(names)]
            field = rng.choice(["dtype", "shape", "offsets", "drop"])
            if field == "dtype":
                t["dtype"] = rng.choice(["F16", "BF16", "I32", "I64", "U8", "F8_E4M3", "C64", "", 5, None])
            elif field == "shape":
                t["shape"] = rng.choice([[-1], [], [1 << 62, 1 << 62], list(reversed(t["shape"])), "x",
                                         [d * 2 for d in t["shape"]], [*t["shape"], 1], [1.5]])
            elif field == "offsets":
                b0, e0 = t["data_offsets"]
                t["data_offsets"] = rng.choice([[b0, 1 << 62], [-8, e0], [e0, b0], [b0, e0 + 4], [b0 + 4, e0 + 4],
                                                [0, e0 - b0], [b0], "x", [b0, (1 << 64) + 1]])
            else:
                t.pop(rng.choice(["dtype", "shape", "data_offsets"]))
            yield f"{field}", struct.pack("<Q", len(json.dumps(h))) + json.dumps(h).encode() + data


def test_fuzzed_gguf_and_safetensors_files_end_cleanly(tiny_gguf, tiny_dir, tmp_path):
    """Seeded mutations of a valid GGUF (180 cases) and a valid safetensors checkpoint (150): opening and
    indexing each ends in a LayerstreamError naming the file, or in a store that verifies; never another
    exception; each case within 2 s, and the process's peak memory grows by less than 200 MB over all."""
    rng = random.Random(23)
    work = tmp_path / "cases"
    # the valid files load (and warm transformers' imports and caches before the memory baseline)
    _open_and_index(tiny_gguf, tmp_path / "warm-gguf")
    _open_and_index(tiny_dir, tmp_path / "warm-st")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    outcomes: dict[str, int] = {}

    def one(label: str, make_case, name: str):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        path = make_case(work)
        t0 = time.time()
        try:
            got = _clean(path, work / "store", name)
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}") from e
        except BaseException as e:   # anything but a clean error fails the test, with the case that made it
            raise AssertionError(f"{label}: {type(e).__name__}: {e}") from e
        assert time.time() - t0 < 2, f"{label}: took {time.time() - t0:.1f} s"
        outcomes[got] = outcomes.get(got, 0) + 1

    raw = tiny_gguf.read_bytes()
    for label, data in _gguf_cases(raw, _gguf_offsets(tiny_gguf), rng, 180):
        def make(d, data=data):
            (d / "fuzz.gguf").write_bytes(data)
            return d / "fuzz.gguf"
        one(f"gguf {label}", make, "fuzz.gguf")
    raw = (tiny_dir / "model.safetensors").read_bytes()
    for label, data in _safetensors_cases(raw, rng, 150):
        def make(d, data=data):
            src = d / "fuzzmodel"
            src.mkdir()
            shutil.copyfile(tiny_dir / "config.json", src / "config.json")
            (src / "model.safetensors").write_bytes(data)
            return src
        one(f"safetensors {label}", make, "fuzzmodel")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak   # KiB on Linux
    assert grown < 200 << 10, f"peak memory grew by {grown >> 10} MB"
    print(outcomes)
    assert outcomes.get("error", 0) > 200, outcomes     # the mutations do damage files ...


ODD = [None, -1, 0, 1 << 70, 1.5, True, "", "x", "../../etc/passwd", "/etc/passwd", [], [0], {}, {"a": 1}]


def _manifest_cases(m: dict, rng: random.Random, n: int):
    """(label, text) of `n` seeded mutations of a manifest: truncations, byte flips, and one value anywhere in
    it (a field, a unit's field, an in-place range or slot entry) replaced by a value of another type or size."""
    text = json.dumps(m)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            cut = rng.randrange(0, len(text))
            yield f"truncate@{cut}", text[:cut]
        elif kind == 1:
            b = bytearray(text.encode())
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            yield "flip", b.decode("utf-8", "surrogateescape")
        else:
            d = json.loads(text)
            node, path = d, []
            while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.7):
                key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
                path.append(key)
                parent, node = node, node[key]
            if path:
                parent[path[-1]] = rng.choice(ODD + [rng.randrange(-5, 1 << 20)])
            yield "set " + "/".join(map(str, path)), json.dumps(d)


@pytest.mark.parametrize("in_place", [False, True], ids=["split", "in-place"])
def test_fuzzed_manifests_end_cleanly(tiny_dir, tiny_store, tmp_path, in_place):
    """Seeded mutations of a store's manifest (80 a store kind): opening the store and verifying it (what
    `layerstream verify` does, and a load before any weight is used) ends in a StoreError naming the
    manifest, or in verify's list of problems, or in a store that verifies; never another exception."""
    base = index_in_place(open_source(tiny_dir), tmp_path / "base", progress=False) if in_place else tiny_store
    rng = random.Random(230 + in_place)
    m = json.loads((base / "manifest.json").read_text())
    outcomes: dict[str, int] = {}
    for label, text in _manifest_cases(m, rng, 80):
        out = tmp_path / "case"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        (out / "manifest.json").write_text(text, errors="surrogateescape")
        try:
            problems = Store(out).verify()
            got = "damaged" if problems else "loaded"
        except StoreError as e:
            assert "manifest.json" in str(e) or "case" in str(e), f"{label}: {e}"
            got = "error"
        except BaseException as e:
            raise AssertionError(f"{label}: {type(e).__name__}: {e}") from e
        outcomes[got] = outcomes.get(got, 0) + 1
    assert outcomes.get("error", 0) > 40, outcomes

"""layerstream.store.io: safetensors headers, unit byte layouts (aligned reads, joined pieces), reading them."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from layerstream.errors import StoreError
from layerstream.store.io import (
    ALIGN,
    TensorSlot,
    aligned_empty,
    in_place_slots,
    make_layout,
    read_header,
    read_layout,
    release_rows_as_read,
    tensor_views,
)


def _tensors():
    return {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "b.bias": torch.tensor([-1, 2, -3], dtype=torch.int8),
            "c.scale": torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
            "d.flag": torch.tensor(7, dtype=torch.int64)}   # a 0-d tensor


def test_read_header_slots_point_at_each_tensors_bytes(tmp_path):
    f = tmp_path / "unit.safetensors"
    tensors = _tensors()
    save_file(tensors, f, metadata={"format": "pt"})
    slots, end = read_header(f)
    assert end == f.stat().st_size
    assert {s.name for s in slots} == set(tensors)      # __metadata__ is not a tensor
    raw = f.read_bytes()
    for s in slots:
        t = tensors[s.name]
        assert s.dtype == t.dtype and s.shape == tuple(t.shape)
        assert s.end - s.begin == t.numel() * t.element_size()
        got = torch.frombuffer(bytearray(raw[s.begin:s.end]), dtype=s.dtype).reshape(s.shape)
        assert torch.equal(got, t)


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b"\x01\x02\x03"), "shorter than a safetensors header"),
    (lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"), "header length is implausible"),
    (lambda p: p.write_bytes(struct.pack("<Q", 9) + b"not json!"), "not a readable safetensors unit file"),
    (lambda p: _write_raw(p, {"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor x has unsupported dtype C64"),
])
def test_read_header_damage_is_a_store_error_naming_the_file(tmp_path, make, match):
    f = tmp_path / "layer.3.safetensors"
    make(f)
    with pytest.raises(StoreError, match=match) as e:
        read_header(f)
    assert "layer.3.safetensors" in str(e.value)


def test_read_header_of_a_missing_file(tmp_path):
    with pytest.raises(StoreError, match="nope.safetensors: not a readable safetensors unit file"):
        read_header(tmp_path / "nope.safetensors")


def test_read_header_end_is_the_furthest_tensor(tmp_path):
    f = tmp_path / "u.safetensors"
    _write_raw(f, {"__metadata__": {"k": "v"},
                   "late": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                   "early": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16)
    slots, end = read_header(f)
    base = f.stat().st_size - 16
    assert end == f.stat().st_size
    assert [(s.name, s.begin, s.end) for s in slots] == [("late", base + 8, base + 16), ("early", base, base + 8)]


def test_make_layout_aligns_each_range_and_places_slots(tmp_path):
    p, q = tmp_path / "p", tmp_path / "q"
    ranges = [(p, 100, 5000), (q, 8192, 8200)]
    a = TensorSlot("a", torch.float32, (2,), 0, 8)
    b = TensorSlot("b", torch.float32, (1000,), 800, 4800)
    c = TensorSlot("c", torch.int8, (8,), 0, 8)
    lay = make_layout(ranges, [(a, 0), (b, 0), (c, 1)])
    # each range read from its 4096-aligned start to its 4096-aligned end, laid one after another
    assert lay.reads == [(p, 0, 8192, 0), (q, 8192, 12288, 8192)]
    assert all(a0 % ALIGN == 0 and a1 % ALIGN == 0 and off % ALIGN == 0 for _, a0, a1, off in lay.reads)
    # where each range's first byte lands, and its length
    assert lay.data == [(100, 4900), (8192, 8)]
    assert [(s.name, s.begin, s.end) for s in lay.slots] == [("a", 100, 108), ("b", 900, 4900), ("c", 8192, 8200)]
    assert lay.size == 12288 and lay.joins == []
    assert lay.file_offset == {"a": (p, 100), "b": (p, 900), "c": (q, 8192)}


def test_make_layout_joins_pieces_after_the_reads(tmp_path):
    p, q = tmp_path / "p", tmp_path / "q"
    ranges = [(p, 100, 5000), (q, 8192, 8200)]
    joined = TensorSlot("gate_up", torch.float32, (4,), 0, 0)
    lay = make_layout(ranges, [(joined, [(0, 8, 16), (1, 0, 8)])])
    # the joined tensor goes after the ranges; its pieces are copied there from where they were read
    assert lay.joins == [(12288, [(108, 8), (8192, 8)])]
    (s,) = lay.slots
    assert (s.begin, s.end) == (12288, 12304)
    assert lay.file_offset["gate_up"] == (p, 108)
    assert lay.size == 12288 + 64   # rounded up to 64 bytes


def test_in_place_slots_reads_manifest_entries():
    got = in_place_slots({"w": ["F32", [2, 3], 0, 16, 40],
                          "gu": ["BF16", [4, 2], [[0, 0, 8], [1, 8, 16]]]})
    assert got == [(TensorSlot("w", torch.float32, (2, 3), 16, 40), 0),
                   (TensorSlot("gu", torch.bfloat16, (4, 2), 0, 0), [(0, 0, 8), (1, 8, 16)])]
    with pytest.raises(KeyError):
        in_place_slots({"x": ["NOPE", [1], 0, 0, 4]})


def test_a_layout_read_gives_the_tensors_back(tmp_path):
    """Two files, a tensor in each and one joined from a piece of each: read_layout + tensor_views give the
    exact values (buffered, and through the parallel-chunk path)."""
    from concurrent.futures import ThreadPoolExecutor

    x = torch.arange(6, dtype=torch.float32)
    y = torch.arange(100, 104, dtype=torch.int32)
    p, q = tmp_path / "p.bin", tmp_path / "q.bin"
    p.write_bytes(b"\xee" * 5000 + x.numpy().tobytes() + b"\xee" * 300)
    q.write_bytes(b"\xdd" * 4100 + y.numpy().tobytes())
    ranges = [(p, 5000, 5024), (q, 4100, 4116)]
    slots = [(TensorSlot("x", torch.float32, (2, 3), 0, 24), 0),
             (TensorSlot("y", torch.int32, (4,), 0, 16), 1),
             (TensorSlot("xy", torch.float32, (4,), 0, 0), [(0, 16, 24), (1, 0, 8)])]
    lay = make_layout(ranges, slots)
    want_xy = torch.cat([x[4:], y[:2].view(torch.float32)])
    for pool, chunk in ((None, 16 << 20), (ThreadPoolExecutor(3), 4096)):
        buf = aligned_empty(lay.size)
        assert buf.data_ptr() % ALIGN == 0 and buf.numel() == lay.size
        read_layout(lay, buf, pool=pool, chunk=chunk)
        views = tensor_views(buf, lay.slots)
        assert torch.equal(views["x"], x.reshape(2, 3))
        assert torch.equal(views["y"], y)
        assert torch.equal(views["xy"], want_xy)
        if pool:
            pool.shutdown()


def test_rows_as_read_are_given_back_once_reordered(tmp_path):
    """A tensor whose rows are reordered after the read (a GGUF's q/k rows) lies twice in its buffer: as read,
    and reordered. The rows as read are dead afterwards: their whole pages go back to the OS (a resident unit
    would otherwise keep them), and every tensor still reads right."""
    w = torch.arange(6 * 4096, dtype=torch.int32).reshape(6, 4096)   # 6 rows of 16 KB
    b = torch.arange(64, dtype=torch.int32)
    p = tmp_path / "p.bin"
    p.write_bytes(w.numpy().tobytes() + b.numpy().tobytes())
    n = w.numel() * 4
    order = [2, 0, 1, 5, 3, 4]
    lay = make_layout([(p, 0, n + 256)], [(TensorSlot("w", torch.int32, (6, 4096), 0, n), 0, order),
                                          (TensorSlot("b", torch.int32, (64,), n, n + 256), 0)])
    buf = aligned_empty(lay.size)
    read_layout(lay, buf)
    released = release_rows_as_read(lay, buf)
    assert released >= n - 2 * 4096 and released % 4096 == 0, released
    views = tensor_views(buf, lay.slots)
    assert torch.equal(views["w"], w[order]) and torch.equal(views["b"], b)


@pytest.mark.parametrize("header", [b"[1, 2]", b'{"w": {"dtype": "F32", "shape": [1]}}', b'{"w": 3}'])
def test_a_json_header_of_the_wrong_shape_is_a_store_error(tmp_path, header):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(StoreError, match="malformed header"):
        read_header(f)

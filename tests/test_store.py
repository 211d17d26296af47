"""The store: atomic, resumable, checked. Damage is found before weights are used."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from layerstream import AutoModel, Store
from layerstream.errors import DiskSpaceError, SourceError, StoreError, UnsupportedModelError
from layerstream.store import PROGRESS, split

from conftest import ROOT, make_model_dir, make_tiny_dir, run_cli


@pytest.fixture
def small_src(tmp_path):
    return make_model_dir(tmp_path / "src", "llama", layers=4)


def units_of(store):
    return [(u.name, u.bytes, u.sha256) for u in Store(store).manifest.units]


def test_split_layout_and_manifest(small_src, tmp_path):
    out = split(small_src, tmp_path / "store", progress=False)
    s = Store(out)
    m = s.manifest
    assert [u.name for u in m.units] == ["embed", "layer.0", "layer.1", "layer.2", "layer.3", "head"]
    assert m.architecture == "LlamaForCausalLM" and m.dtype == "float32"
    for u in m.units:
        assert (out / u.file).stat().st_size == u.bytes
    assert not s.verify()
    assert (out / "config.json").is_file()
    assert not list(out.glob("**/.*.tmp"))
    # splitting again is a no-op
    before = (out / "manifest.json").stat().st_mtime_ns
    split(small_src, out, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.parametrize("how", [{}, {"quantize": "int4", "workers": 2}], ids=["float", "int4-threads"])
def test_killed_split_resumes_to_the_same_store(tmp_path, how):
    """kill -9 in the middle of a split (int4: while threads quantize one unit and the next): the journal holds
    only written units, the store is not usable until finished, and the resumed split redoes none of them and
    ends with the same bytes as an uninterrupted (for int4: serial) split."""
    src = make_model_dir(tmp_path / "src", "llama", layers=40, seed=3)
    ref = split(src, tmp_path / "ref", progress=False, **({**how, "workers": 1} if how else {}))
    out = tmp_path / "killed"
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from layerstream.store import split; " \
           f"split({str(src)!r}, {str(out)!r}, progress=False, **{how!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        p = out / PROGRESS
        if p.is_file() and len(p.read_text().splitlines()) >= 5:
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed too late: the split had finished"
    done_before = {json.loads(line)["name"]: (out / json.loads(line)["file"]).stat().st_mtime_ns
                   for line in (out / PROGRESS).read_text().splitlines() if line.endswith("}")}
    assert 5 <= len(done_before) < 42
    with pytest.raises(StoreError):
        Store(out)  # no manifest: not usable until finished
    split(src, out, progress=False, **how)
    assert units_of(out) == units_of(ref)
    for name, mtime in done_before.items():  # finished units were not redone
        assert (out / Store(out).units[name].file).stat().st_mtime_ns == mtime
    assert not list(out.glob("**/.*.tmp"))
    for f in [*sorted(p.relative_to(ref) for p in (ref / "units").iterdir()), "manifest.json"]:
        assert (ref / f).read_bytes() == (out / f).read_bytes(), f


def test_partial_split_of_another_source_is_refused(tmp_path):
    a = make_model_dir(tmp_path / "a", "llama", seed=1)
    b = make_model_dir(tmp_path / "b", "llama", seed=2)
    out = tmp_path / "store"
    split(a, out, progress=False)
    (out / "manifest.json").unlink()  # now a partial store of `a`
    with pytest.raises(StoreError, match="another source"):
        split(b, out, progress=False)


def test_truncated_unit_is_reported_with_its_file(small_src, tmp_path):
    out = split(small_src, tmp_path / "store", progress=False)
    f = out / Store(out).units["layer.2"].file
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    with pytest.raises(StoreError, match="layer.2.safetensors"):
        AutoModel.from_pretrained(out, max_ram=0, progress=False)


@pytest.mark.parametrize("max_ram", [0, None])
def test_altered_unit_detected_before_use(small_src, tmp_path, max_ram):
    out = split(small_src, tmp_path / "store", progress=False)
    f = out / Store(out).units["layer.1"].file
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="layer.1.safetensors.*checksum"):
        m = AutoModel.from_pretrained(out, max_ram=max_ram, progress=False)
        m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)


def test_foreign_unit_detected(tmp_path):
    a = split(make_model_dir(tmp_path / "a", "llama", layers=4, seed=1), tmp_path / "sa", progress=False)
    b = split(make_model_dir(tmp_path / "b", "llama", layers=4, seed=2), tmp_path / "sb", progress=False)
    # same names and shapes, other weights: only the content checksum can tell
    shutil.copyfile(b / "units/layer.0.safetensors", a / "units/layer.0.safetensors")
    # another layer's file in this layer's place: the header names tell
    shutil.copyfile(a / "units/layer.2.safetensors", a / "units/layer.3.safetensors")
    m = None
    with pytest.raises(StoreError, match="layer.0.safetensors"):
        m = AutoModel.from_pretrained(a, max_ram=0, progress=False)
        m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    r = run_cli("verify", a)
    assert r.returncode == 1
    assert "layer.0.safetensors" in r.stderr and "layer.3.safetensors" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        split(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="not a model directory"):
        split(tmp_path / "empty", tmp_path / "out", progress=False)
    pkl = make_model_dir(tmp_path / "pkl", "llama")
    (pkl / "model.safetensors").rename(pkl / "pytorch_model.bin")
    with pytest.raises(SourceError, match="safetensors only"):
        split(pkl, tmp_path / "out", progress=False)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import BertConfig

    make_tiny_dir(tmp_path / "bert", BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=37, vocab_size=64, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match="BertLMHeadModel.*not among the"):
        split(tmp_path / "bert", tmp_path / "out", progress=False)


def _tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")


def test_disk_full_refused_before_writing_and_during_split(small_src, tmp_path):
    ref = split(small_src, tmp_path / "ref", progress=False)
    need = sum(u.bytes for u in Store(ref).manifest.units)
    tiny = tmp_path / "tiny"
    _tmpfs(tiny, "64k")
    try:
        with pytest.raises(DiskSpaceError, match="needs"):
            split(small_src, tiny / "store", progress=False)
        assert not list((tiny / "store" / "units").iterdir())
    finally:
        subprocess.run(["umount", str(tiny)])
    # room for the estimate but not for the files' page rounding: ENOSPC in the middle of a unit
    full = tmp_path / "full"
    _tmpfs(full, str(need + 8192))
    try:
        with pytest.raises(DiskSpaceError, match="disk full"):
            split(small_src, full / "store", progress=False)
        out = full / "store"
        assert not (out / "manifest.json").exists()
        assert not list(out.glob("units/.*.tmp"))
        recorded = [json.loads(line) for line in (out / PROGRESS).read_text().splitlines()]
        for rec in recorded:  # every unit marked done is whole
            assert (out / rec["file"]).stat().st_size == rec["bytes"]
        assert len(recorded) < len(Store(ref).manifest.units)
        subprocess.run(["mount", "-o", f"remount,size={4 * need}", str(full)], check=True)
        split(small_src, out, progress=False)
        assert units_of(out) == units_of(ref)
    finally:
        subprocess.run(["umount", str(full)])


@pytest.mark.slow
def test_hub_id_goes_through_the_hub_cache(tmp_path):
    """The real hub code path (huggingface_hub.snapshot_download), served from a local hub cache."""
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    make_model_dir(snap, "llama")
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = run_cli("plan", "tiny-org/tiny-llama", "--store", tmp_path / "store", "--max-ram", "0", env=env)
    assert r.returncode == 0, r.stderr
    assert Store(tmp_path / "store").manifest.architecture == "LlamaForCausalLM"
    r = run_cli("plan", "tiny-org/not-cached", "--store", tmp_path / "store2", env=env)
    assert r.returncode == 1 and "cannot download" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_in_place_store_has_no_copy_and_matches_split(small_src, tmp_path):
    from layerstream.sources import open_source
    from layerstream.store import index_in_place

    out = index_in_place(open_source(small_src), tmp_path / "inplace", progress=False)
    assert not (out / "units").exists()
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 50_000  # manifest, config, no weights
    s = Store(out)
    assert s.manifest.in_place and not s.verify()
    ids = torch.tensor([[1, 2, 3, 4]])
    a = AutoModel.from_pretrained(out, max_ram=0, progress=False).generate(ids, max_new_tokens=6, do_sample=False)
    b = AutoModel.from_pretrained(small_src, max_ram=0, store_path=tmp_path / "split", in_place=False,
                                  progress=False).generate(ids, max_new_tokens=6, do_sample=False)
    assert a.tolist() == b.tolist()
    r = run_cli("split", small_src, tmp_path / "cli-inplace", "--in-place")
    assert r.returncode == 0 and Store(tmp_path / "cli-inplace").manifest.in_place, r.stderr


def test_in_place_source_changes_are_detected(small_src, tmp_path):
    from layerstream.sources import open_source
    from layerstream.store import index_in_place

    out = index_in_place(open_source(small_src), tmp_path / "inplace", progress=False)
    shard = small_src / "model.safetensors"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-64] ^= 0x55  # inside the last tensor's data
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="changed since it was indexed"):
        AutoModel.from_pretrained(out, max_ram=0, progress=False)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the content tells
    with pytest.raises(StoreError, match="checksum mismatch"):
        m = AutoModel.from_pretrained(out, max_ram=0, progress=False)
        m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert Store(out).verify()  # and verify names the problem


def test_store_vanishing_mid_run_is_a_clear_error(small_src, tmp_path):
    """The store's directory moves away while tokens are being generated: the next read fails with the
    unit and file named; nothing hangs; generate raises instead of returning a short answer."""
    out = split(small_src, tmp_path / "store", progress=False)
    m = AutoModel.from_pretrained(out, max_ram=0, progress=False)

    class MoveAfter:
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 3:
                shutil.move(out, tmp_path / "moved")

        def end(self):
            pass

    t0 = time.time()
    with pytest.raises(StoreError, match=r"(layer\.\d|head|embed).*(missing or moved|cannot)"):
        m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, do_sample=False, streamer=MoveAfter())
    assert time.time() - t0 < 30
    m.close()


def test_default_stores_are_kept_apart_by_dtype(tmp_path, monkeypatch):
    """A bf16 store made once must not become what a later default (float) load gets, and back."""
    from layerstream.store import resolve

    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    src = make_model_dir(tmp_path / "src", "llama")
    bf16 = resolve(src, dtype=torch.bfloat16, progress=False)
    plain = resolve(src, progress=False)
    assert bf16 != plain
    assert Store(bf16).manifest.dtype == "bfloat16" and Store(plain).manifest.dtype == "float32"
    assert resolve(src, dtype=torch.bfloat16, progress=False) == bf16   # and reused

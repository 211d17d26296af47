"""Faults in batch jobs: lines that fail (in the engine, in tokenizing, with values that cannot be computed) become
error records and the job goes on, a resume giving the bytes of an uninterrupted run; the output's paths are
checked before the model loads; a full disk is a one-line error that loses nothing; the output is never
written through a link planted at OUT.tmp or OUT.partial. On test_batch's tiny Llama with its character-level
tokenizer (real files, the CLI in real subprocesses)."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from conftest import make_model_dir, run_cli
from test_batch import CHAT, greedy_text, read_records, req, save_char_tokenizer, write_lines

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0   # root writes in read-only directories


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """test_batch's model: a tiny Llama with a character-level tokenizer and a chat template."""
    from layerstream.store import resolve

    root = tmp_path_factory.mktemp("batch-faults")
    src = make_model_dir(root / "tiny", "llama")
    save_char_tokenizer(src)
    return resolve(src, store_path=root / "store", progress=False)


@pytest.fixture(scope="module")
def model(tiny_store):
    from layerstream import AutoModel

    return AutoModel.from_pretrained(tiny_store, progress=False, threads=1)


def poisoned_sampler(monkeypatch):
    """The engine's real sampler, except for rows with top_p 0.123, whose sampling raises (a fault that no
    request can cause any more: it stands for any failure of one row's own work)."""
    from layerstream.engine import requests

    real = requests.sample

    def sample(logits, temperature=0.0, top_p=1.0, *args, **kwargs):
        if top_p == 0.123:
            raise RuntimeError("injected fault")
        return real(logits, temperature, top_p, *args, **kwargs)

    monkeypatch.setattr(requests, "sample", sample)


def test_lines_that_fail_become_error_records_and_a_resume_gives_the_same_bytes(tmp_path, model, monkeypatch):
    """Among good lines: one whose sampling fails in the engine (a 500 record), a temperature of 1e-300 (greedy
    now: it made the sampler's probabilities NaN and crashed every rerun), a temperature of Infinity (refused:
    a 400 record), a completions prompt with a lone surrogate (an error record), and a custom_id with a lone
    surrogate (kept, as an escape). The good lines get exactly their greedy text; the job ends; a job stopped
    before writing OUT and run again gives the bytes of the uninterrupted run."""
    from layerstream.engine import batch

    poisoned_sampler(monkeypatch)
    lines = [req("g0", prompt="The sea is", max_tokens=6, temperature=0),
             req("bad", prompt="Once upon a time", max_tokens=6, temperature=0.7, top_p=0.123),
             req("tiny", prompt="Once upon", max_tokens=6, temperature=1e-300),
             req("g1", CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0),
             req("inf", prompt="x", max_tokens=3, temperature=float("inf")),
             req("sur", prompt="a\ud800b", max_tokens=3, temperature=0),
             req("id-\ud800", prompt="1 2 3", max_tokens=4, temperature=0),
             req("g2", prompt="Hello, world", max_tokens=7, temperature=0)]
    assert '"temperature": Infinity' in lines[4] and '"a\\ud800b"' in lines[5]
    src = write_lines(tmp_path / "in.jsonl", lines)
    s = batch.run_batch(model, src, tmp_path / "ref.jsonl", batch_size=3, progress=False)
    assert s["requests"] == 8 and s["succeeded"] + s["failed"] == 8
    ref = (tmp_path / "ref.jsonl").read_bytes()
    recs = [json.loads(line) for line in ref.decode("utf-8").splitlines()]
    by_id = {r["custom_id"]: r for r in recs}
    assert [r["custom_id"] for r in recs] == ["g0", "bad", "tiny", "g1", "inf", "sur", "id-\ud800", "g2"]
    tok = model.tokenizer
    for cid, prompt, n in (("g0", "The sea is", 6), ("g2", "Hello, world", 7), ("id-\ud800", "1 2 3", 4)):
        assert by_id[cid]["error"] is None
        want = greedy_text(model, tok(prompt)["input_ids"], n)[0]
        assert by_id[cid]["response"]["body"]["choices"][0]["text"] == want
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if hasattr(chat, "keys") else chat
    assert by_id["g1"]["response"]["body"]["choices"][0]["message"]["content"] == greedy_text(model, chat, 5)[0]
    bad = by_id["bad"]
    assert bad["error"] == {"code": "internal_error",
                            "message": "request line-1 failed while sampling: RuntimeError: injected fault"}
    assert bad["response"]["status_code"] == 500 and bad["response"]["body"]["error"]["type"] == "server_error"
    tiny = by_id["tiny"]
    if tiny["error"] is None:   # below 1e-5: greedy
        assert tiny["response"]["body"]["choices"][0]["text"] == greedy_text(model, tok("Once upon")["input_ids"], 6)[0]
    else:                       # or refused when the body is read
        assert tiny["response"]["status_code"] == 400 and "temperature" in tiny["error"]["message"]
    assert by_id["inf"]["response"]["status_code"] == 400 and "temperature" in by_id["inf"]["error"]["message"]
    assert by_id["sur"]["error"] is not None and by_id["sur"]["response"]["status_code"] in (400, 500)
    assert b"id-\\ud800" in ref   # the lone surrogate as its JSON escape (UTF-8 cannot hold it)

    def stop(*args):
        raise RuntimeError("stop here")

    monkeypatch.setattr(batch, "write_output", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        batch.run_batch(model, src, tmp_path / "out.jsonl", batch_size=3, progress=False)
    monkeypatch.undo()
    poisoned_sampler(monkeypatch)
    s = batch.run_batch(model, src, tmp_path / "out.jsonl", batch_size=2, progress=False)
    assert s["resumed"] == s["succeeded"] - s["ran"] > 0   # the successes resumed, the failed lines run again
    assert (tmp_path / "out.jsonl").read_bytes() == ref


def cli_batch(*args, **kw):
    return run_cli("batch", *args, timeout=120, **kw)


def one_line_error(r, *words):
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("layerstream: error:"), r.stderr[-2000:]
    for w in words:
        assert w in last, last
    return last


def test_cli_refuses_unwritable_outputs_before_the_model_loads(tmp_path):
    """Each refused with a one-line error, exit status 1, before the model loads (the model named does not even
    exist: its error would come first if it loaded; nothing is imported for it). A link planted at OUT.tmp is
    refused and its target left as it was (OUT.partial: test_the_path_checks_of_run_batch)."""
    src = write_lines(tmp_path / "in.jsonl", [req("a", prompt="x", max_tokens=2)])
    nomodel = ("--model", tmp_path / "no-such-model")
    (tmp_path / "outdir").mkdir()
    one_line_error(cli_batch(src, tmp_path / "outdir", *nomodel), "is a directory")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, tmp_path / "out.jsonl.tmp")
    r = cli_batch(src, tmp_path / "out.jsonl", *nomodel)
    one_line_error(r, f"{tmp_path / 'out.jsonl.tmp'} is a symbolic link", "remove it")
    assert "importing torch" not in r.stderr
    assert target.read_text() == "keep me" and not (tmp_path / "out.jsonl").exists()


@pytest.mark.skipif(ROOT, reason="root writes in a read-only directory")
def test_cli_refuses_a_read_only_directory_before_the_model_loads(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [req("a", prompt="x", max_tokens=2)])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = cli_batch(src, ro / "out.jsonl", "--model", tmp_path / "no-such-model")
        one_line_error(r, f"cannot write in {ro} (permission denied)")
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_the_path_checks_of_run_batch(tmp_path, monkeypatch):
    """What `check_paths` (run before the model loads) refuses, each with its message; the free-space check
    with the file system's answer replaced by one of 4096 bytes free (a full disk cannot be made here)."""
    import shutil

    from layerstream.engine.batch import check_paths
    from layerstream.errors import DiskSpaceError, InputError

    src = write_lines(tmp_path / "in.jsonl", [req("a", prompt="x", max_tokens=2)])
    check_paths(src, tmp_path / "out.jsonl")
    (tmp_path / "out.jsonl.partial").mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, tmp_path / "linked.jsonl.partial")
    for out, message in ((tmp_path / "missing" / "out.jsonl", "missing: no such directory for the output"),
                         (src, "is the input file"), (tmp_path, "is a directory"),
                         (tmp_path / "out.jsonl", "out.jsonl.partial exists and is not a file"),
                         (tmp_path / "linked.jsonl", "linked.jsonl.partial is a symbolic link: a batch job keeps "
                                                     "its journal there")):
        with pytest.raises(InputError, match=message):
            check_paths(src, out)
    assert target.read_text() == "keep me"
    with pytest.raises(InputError, match="no such input file"):
        check_paths(tmp_path / "none.jsonl", tmp_path / "x.jsonl")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(DiskSpaceError, match="has 4096 bytes free; a batch job needs at least"):
        check_paths(src, tmp_path / "other.jsonl")


def test_the_output_is_never_written_through_a_planted_link(tmp_path, model):
    """OUT.tmp planted as a link after the job's checks (or left as a file by a killed job) is removed and made
    anew: the link's target is unchanged, OUT is right. A journal path that is a link is never opened. A job
    refuses a link planted before it starts."""
    from layerstream.engine.batch import run_batch
    from layerstream.engine.journal import Journal, OutputError, write_output
    from layerstream.errors import InputError

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    journal = Journal(tmp_path / "out.jsonl.partial", {"test": 1})
    try:
        final = {k: journal.append(k, "h", {"error": None, "response": None, "n": k}) for k in range(3)}
        journal.sync()
        os.symlink(target, tmp_path / "out.jsonl.tmp")
        assert write_output(tmp_path / "out.jsonl", journal, final, 0) == 3
        assert target.read_text() == "keep me" and not os.path.lexists(tmp_path / "out.jsonl.tmp")
        assert [r["n"] for r in read_records(tmp_path / "out.jsonl")] == [0, 1, 2]
        (tmp_path / "out.jsonl.tmp").write_text("stale")   # left by a job killed while writing OUT
        write_output(tmp_path / "out.jsonl", journal, final, 0)
        assert [r["n"] for r in read_records(tmp_path / "out.jsonl")] == [0, 1, 2]
    finally:
        journal.close()

    os.symlink(target, tmp_path / "late.jsonl.partial")   # a journal link planted after the checks: not opened
    with pytest.raises(OutputError, match="late.jsonl.partial .it is a symbolic link, which a batch job never"):
        Journal(tmp_path / "late.jsonl.partial", {"test": 1})
    assert target.read_text() == "keep me"

    src = write_lines(tmp_path / "in.jsonl", [req("a", prompt="x", max_tokens=2, temperature=0)])
    os.symlink(target, tmp_path / "job.jsonl.tmp")
    with pytest.raises(InputError, match="job.jsonl.tmp is a symbolic link"):
        run_batch(model, src, tmp_path / "job.jsonl", progress=False)
    assert target.read_text() == "keep me" and not (tmp_path / "job.jsonl").exists()


def limit_file_size(n):
    """For a child process: files can grow to `n` bytes; a write past that fails with EFBIG (SIGXFSZ ignored),
    as a full disk fails one with ENOSPC."""
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return set_limit


@pytest.mark.slow
def test_cli_a_full_disk_mid_job_is_one_line_and_a_rerun_resumes_exactly(tmp_path, tiny_store, model):
    """The journal cannot grow past its header and one record (a file size limit: writes fail as on a full disk):
    the job ends with a one-line error (no traceback) naming the journal, which keeps what was written; the
    same command run again resumes and writes the bytes of an uninterrupted run."""
    from layerstream.engine.batch import default_model_name, run_batch
    from layerstream.engine.journal import JOURNAL, JOURNAL_VERSION, dumps, fingerprint

    lines = [req(f"r{k}", prompt=f"Request {k}", max_tokens=12, temperature=0) for k in range(6)]
    src = write_lines(tmp_path / "in.jsonl", lines)
    run_batch(model, src, tmp_path / "ref.jsonl", batch_size=2, progress=False)
    ref = (tmp_path / "ref.jsonl").read_bytes()
    longest = max(len(dumps({"i": k, "h": "0" * 32, "r": json.loads(line)}).encode()) + 1
                  for k, line in enumerate(ref.splitlines()))
    out, journal = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    cmd = [sys.executable, "-m", "layerstream", "batch", src, out, "--model", tiny_store, "--batch-size", "2",
           "--threads", "1"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    header = len(dumps({JOURNAL: JOURNAL_VERSION, **fingerprint(model, default_model_name(model))})) + 1
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                       timeout=300, preexec_fn=limit_file_size(header + longest + 8))
    last = one_line_error(r, f"cannot write the journal {journal} (File too large: the disk (or a file size limit) "
                             f"is full)", "run the same command again to resume")
    assert not out.exists()
    kept = journal.read_bytes().split(b"\n")
    assert len(kept) >= 3 and all(json.loads(k) for k in kept[:-1]), last   # the header and at least one record
    r = run_cli(*cmd[3:], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming:" in r.stderr
    assert out.read_bytes() == ref and not journal.exists()

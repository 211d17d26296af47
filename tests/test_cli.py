"""The command line as a user runs it: real subprocesses, the embedded model, one-line errors."""

import json

import pytest

from conftest import make_model_dir, make_tiny_dir, run_cli


def assert_clean_error(r, pattern):
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("layerstream: error:")]
    assert len(lines) == 1 and pattern in lines[0], r.stderr[-2000:]


@pytest.mark.slow
def test_run_streams_text_and_prints_stats(embedded_store):
    r = run_cli("run", "Name three colors.", "--model", embedded_store, "--max-new-tokens", "16", "--max-ram", "0",
                "--verbose")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) >= 3
    assert "importing torch" in r.stderr and "plan on cpu" in r.stderr
    assert "measured read bandwidth" in r.stderr and "s per token from streaming alone" in r.stderr
    stats = r.stderr.strip().splitlines()[-1]
    assert "tok/s" in stats and "read per sweep" in stats and "peak RSS" in stats


@pytest.mark.slow
def test_profile_prints_per_unit_io_copy_compute(embedded_store):
    r = run_cli("run", "Hi", "--model", embedded_store, "--max-new-tokens", "4", "--max-ram", "0", "--profile")
    assert r.returncode == 0, r.stderr
    assert "wait ms" in r.stderr and "compute ms" in r.stderr and "copy ms" in r.stderr
    rows = [line.split() for line in r.stderr.splitlines() if line.strip().startswith("layer.")]
    assert len(rows) == 30 and all(int(row[1]) >= 4 for row in rows)   # every layer, every sweep
    assert "per sweep" in r.stderr


@pytest.mark.slow
def test_chat_subcommand_keeps_history(embedded_store):
    r = run_cli("chat", "--model", embedded_store, "--max-new-tokens", "8",
                input="Hello, who are you?\nWhat did I just ask?\n/exit\n")
    assert r.returncode == 0, r.stderr
    prefills = [int(line.split("prefilled ")[1].split()[0]) for line in r.stderr.splitlines() if "prefilled" in line]
    assert len(prefills) == 2 and prefills[1] < prefills[0] + 20


@pytest.mark.slow
def test_chat_ctrl_c_stops_the_reply_and_keeps_the_session(embedded_store):
    """Ctrl-C (SIGINT) during a reply stops that reply at the next token; the session goes on: /reset says it
    cleared the history, the next message is answered, /exit ends with status 0."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    p = subprocess.Popen([sys.executable, "-m", "layerstream", "chat", "--model", str(embedded_store),
                          "--max-new-tokens", "2000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: p.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        p.stdin.write("Count from 1 to 1000, one number per line.\n")
        p.stdin.flush()
        deadline = time.monotonic() + 300
        while len("".join(out).split()) < 5 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, p.stderr.read()[-2000:]
        os.kill(p.pid, signal.SIGINT)
        time.sleep(1)
        p.stdin.write("/reset\nSay hello.\n/exit\n")
        p.stdin.close()
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(timeout=10)
    err = p.stderr.read()
    assert rc == 0, err[-2000:]
    assert "reply stopped" in err and "history cleared" in err and "Traceback" not in err, err[-2000:]
    import re

    replies = [int(m.group(1)) for m in re.finditer(r"(\d+) tokens in [\d.]+ s.*prefilled", err)]
    assert len(replies) == 2, err[-2000:]   # the stopped reply and the next one were both answered
    assert replies[0] < 2000, replies   # the first stopped before its max_new_tokens


@pytest.mark.slow
def test_split_info_verify(tmp_path):
    src = make_model_dir(tmp_path / "src", "mistral")
    r = run_cli("split", src, tmp_path / "store")
    assert r.returncode == 0, r.stderr
    assert "split" in r.stderr and "B/s" in r.stderr   # a progress bar in bytes
    r = run_cli("info", tmp_path / "store")
    assert r.returncode == 0 and "MistralForCausalLM" in r.stdout and "3 layers" in r.stdout
    r = run_cli("verify", tmp_path / "store")
    assert r.returncode == 0, r.stderr
    assert "ok: 5 units match their xxh3 checksums" in r.stderr   # embed, 3 layers, head
    assert "damaged" not in r.stderr
    r = run_cli("plan", tmp_path / "store", "--max-ram", "0")
    assert r.returncode == 0 and "streamed per sweep" in r.stdout and "measured read bandwidth" in r.stdout
    # one flipped byte in one unit (same size, so only the checksum can tell): verify fails and names it
    unit = tmp_path / "store" / "units" / "layer.1.safetensors"
    data = bytearray(unit.read_bytes())
    data[-7] ^= 0x01
    unit.write_bytes(bytes(data))
    r = run_cli("verify", tmp_path / "store")
    assert r.returncode == 1, r.stderr
    damaged = [line for line in r.stderr.splitlines() if line.startswith("damaged:")]
    assert len(damaged) == 1 and "layer.1.safetensors" in damaged[0] and "content checksum mismatch" in damaged[0]
    assert "1 damaged unit file(s)" in r.stderr and "ok:" not in r.stderr and "Traceback" not in r.stderr


# the cases with {store} run on the embedded model's store (split once per session: slow); the others need
# no model and stay in the fast subset
@pytest.mark.parametrize("args, pattern", [
    (["run", "hi", "--model", "/no/such/model"], "no such file"),
    pytest.param(["run", "", "--model", "{store}"], "prompt is empty", marks=pytest.mark.slow),
    pytest.param(["run", "hi", "--model", "{store}", "--max-new-tokens", "0"], "must be positive",
                 marks=pytest.mark.slow),
    pytest.param(["run", "hi", "--model", "{store}", "--max-ram", "lots"], "cannot parse 'lots'",
                 marks=pytest.mark.slow),
    pytest.param(["run", "word " * 9000, "--model", "{store}"], "context", marks=pytest.mark.slow),
    (["run", "hi", "--model", "{empty}"], "not a model directory"),
    (["info", "{empty}"], "no manifest.json"),
])
def test_bad_input_is_one_line_error(tmp_path, request, args, pattern):
    (tmp_path / "empty").mkdir()
    store = request.getfixturevalue("embedded_store") if any("{store}" in a for a in args) else None
    args = [a.format(store=store, empty=tmp_path / "empty") for a in args]
    assert_clean_error(run_cli(*args), pattern)


@pytest.mark.slow
def test_damaged_store_and_unsupported_model(tmp_path):
    from transformers import BertConfig

    make_tiny_dir(tmp_path / "bert", BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=37, vocab_size=64, is_decoder=True))
    assert_clean_error(run_cli("run", "hi", "--model", tmp_path / "bert"), "BertLMHeadModel")
    src = make_model_dir(tmp_path / "src", "llama")
    assert run_cli("split", src, tmp_path / "store").returncode == 0
    manifest = json.loads((tmp_path / "store/manifest.json").read_text())
    (tmp_path / "store" / manifest["units"][2]["file"]).write_bytes(b"garbage")
    assert_clean_error(run_cli("run", "hi", "--model", tmp_path / "store"), "layer.1.safetensors")


@pytest.mark.slow
def test_gpu_budget_too_small_is_clear(tmp_path, embedded_store):
    import torch

    if not torch.cuda.is_available():
        r = run_cli("run", "hi", "--model", embedded_store, "--device", "cuda")
        assert_clean_error(r, "no CUDA")
        return
    r = run_cli("run", "hi", "--model", embedded_store, "--device", "cuda", "--max-gpu-memory", "1MB")
    assert_clean_error(r, "cannot hold the units in flight")


@pytest.mark.slow
def test_the_prompt_comes_from_the_argument_a_file_or_stdin(embedded_store, tmp_path):
    """`run QUESTION`, `run -f FILE`, `echo QUESTION | run` and `run - < FILE` answer the same question (greedy:
    the same text); with nothing piped, the demo prompt."""
    q = "Name three colors."
    (tmp_path / "q.txt").write_text(q)
    common = ["--model", embedded_store, "--max-new-tokens", "8", "--greedy"]
    # `-t 0` instead of --greedy in one of them: the same exact tokens (test_run_samples_by_default...)
    outs = [run_cli("run", q, *common), run_cli("run", "-f", tmp_path / "q.txt", *common),
            run_cli("run", *common, input=q), run_cli("run", "-", *common[:-1], "-t", "0", input=q)]
    assert all(r.returncode == 0 for r in outs), [r.stderr[-500:] for r in outs]
    assert len({r.stdout for r in outs}) == 1 and outs[0].stdout.strip()
    assert "sampling: greedy" in outs[0].stderr and "sampling: greedy" in outs[3].stderr
    demo = run_cli("run", *common, input="")
    assert demo.returncode == 0 and demo.stdout != outs[0].stdout
    assert_clean_error(run_cli("run", q, "-f", tmp_path / "q.txt", *common), "not both")
    assert_clean_error(run_cli("run", "-f", tmp_path / "missing.txt", *common), "cannot read the prompt")


@pytest.mark.slow
def test_run_samples_by_default_seeded_reproducibly_and_greedy_on_request(embedded_store):
    """Sampled by default (the model's defaults, else llama.cpp's), reproducible with --seed; a value out of
    range is refused before the model loads. Greedy on request: test_the_prompt_comes_from... (--greedy, -t 0)."""
    args = ["run", "Write a short poem about the sea.", "--model", embedded_store, "--max-new-tokens", "24"]
    a, b = run_cli(*args, "--seed", "7"), run_cli(*args, "--seed", "7")
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:]
    assert "sampling: temperature 0.8, top_p 0.95, top_k 40, min_p 0.05, repeat penalty 1.1" in a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    for flag, value in (("--top-p", "0"), ("--min-p", "1"), ("-t", "-1")):
        r = run_cli(*args, flag, value)
        assert_clean_error(r, "is out of range")
        assert "importing torch" not in r.stderr


def test_version():
    from layerstream import __version__

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"layerstream {__version__}"


def test_serve_says_a_busy_port_before_loading_the_model(tmp_path):
    """A port in use is a one-line error at once: the model (here one that does not exist) is not even opened."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("serve", "--model", tmp_path / "no-such-model", "--port", port, timeout=60)
    assert_clean_error(r, f"port {port} on 127.0.0.1 is in use")
    assert "importing torch" not in r.stderr

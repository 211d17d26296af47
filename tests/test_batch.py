"""`layerstream batch` and `layerstream.engine.batch.run_batch`: OpenAI batch-format jobs on the continuous-batching
engine, on a tiny random-weight Llama with a character-level tokenizer and a chat template (real files; the CLI
and kill -9 in real subprocesses)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_model_dir, run_cli

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


def save_char_tokenizer(path):
    """A character-level tokenizer over the tiny model's 128 ids (specials, printable ASCII, newline and a few
    multi-character pieces that only generation makes) with a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    pieces = ["the", " and", "ing", "er", " of", "ou", "an", "in", "on", "at", "en", "re", "is", "it", "ed", "es",
              "or", "ar", "al", "st", "le", "ly", "ch", "sh", "th", " a", " t", " s"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"] + pieces)}
    assert len(vocab) == 128
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.add_special_tokens(specials)
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from layerstream.store import resolve

    root = tmp_path_factory.mktemp("batch")
    src = make_model_dir(root / "tiny", "llama")
    save_char_tokenizer(src)
    return resolve(src, store_path=root / "store", progress=False)


@pytest.fixture(scope="module")
def model(tiny_store):
    from layerstream import AutoModel

    return AutoModel.from_pretrained(tiny_store, progress=False, threads=1)


def req(cid, url=TEXT, **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def greedy_text(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    new = out[0, len(ids):].tolist()
    return model.tokenizer.decode(new, skip_special_tokens=True), len(new)


def chat_ids(model, messages):
    enc = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def test_greedy_requests_match_generate_in_order_and_format(tmp_path, model):
    from layerstream.engine.batch import run_batch

    prompts = ["The sea is", "Once upon a time", "x", "Hello, world! How are you today?", "1 2 3 4", "abc"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    lines = [req(f"t{k}", prompt=p, max_tokens=4 + 2 * k, temperature=0) for k, p in enumerate(prompts)]
    lines.insert(2, req("c0", CHAT, messages=msgs, max_tokens=9, temperature=0, model="my-model"))
    lines.insert(4, req("c1", CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                        max_completion_tokens=7, temperature=0))
    src = write_lines(tmp_path / "in.jsonl", lines[:3] + [""] + lines[3:])   # a blank line is skipped
    s = run_batch(model, src, tmp_path / "out.jsonl", batch_size=3, progress=False)
    assert s["requests"] == 8 and s["succeeded"] == 8 and s["failed"] == 0 and s["resumed"] == 0
    assert not (tmp_path / "out.jsonl.partial").exists() and not (tmp_path / "out.jsonl.tmp").exists()
    recs = read_records(tmp_path / "out.jsonl")
    assert [r["custom_id"] for r in recs] == [json.loads(line)["custom_id"] for line in lines]
    created = int(os.stat(src).st_mtime)
    for line, r in zip(lines, recs):
        q = json.loads(line)
        body = q["body"]
        assert r["error"] is None and r["id"].startswith("batch_req_")
        resp = r["response"]
        assert resp["status_code"] == 200 and resp["request_id"].startswith("req_")
        b = resp["body"]
        assert b["created"] == created and b["choices"][0]["index"] == 0
        n = body.get("max_tokens") or body.get("max_completion_tokens")
        if q["url"] == CHAT:
            ids = chat_ids(model, body["messages"] if q["custom_id"] == "c0" else [{"role": "user", "content": "Hi"}])
            assert b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-")
            assert b["choices"][0]["message"]["role"] == "assistant"
            got = b["choices"][0]["message"]["content"]
        else:
            ids = model.tokenizer(body["prompt"])["input_ids"]
            assert b["object"] == "text_completion" and b["id"].startswith("cmpl-")
            got = b["choices"][0]["text"]
        want, n_new = greedy_text(model, ids, n)
        assert got == want, q["custom_id"]
        assert b["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n_new, "total_tokens": len(ids) + n_new}
        assert b["choices"][0]["finish_reason"] == ("length" if n_new == n else "stop")
        assert b["model"] == ("my-model" if q["custom_id"] == "c0" else "tiny")
    assert len({r["id"] for r in recs}) == len(recs)


def test_stop_strings_cut_the_text(tmp_path, model):
    from layerstream.engine.batch import run_batch

    ids = model.tokenizer("Once upon")["input_ids"]
    full, _ = greedy_text(model, ids, 24)
    assert len(full) > 8
    stop = full[5:7]
    cut = full[:full.find(stop)]
    lines = [req("s1", prompt="Once upon", max_tokens=24, temperature=0, stop=stop),
             req("s2", prompt="Once upon", max_tokens=24, temperature=0, stop=["\x01never", stop]),
             req("s3", prompt="Once upon", max_tokens=24, temperature=0, stop="\x01never")]
    run_batch(model, write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", progress=False)
    recs = read_records(tmp_path / "out.jsonl")
    for r in recs[:2]:
        assert r["response"]["body"]["choices"][0]["text"] == cut
        assert r["response"]["body"]["choices"][0]["finish_reason"] == "stop"
    assert recs[2]["response"]["body"]["choices"][0]["text"] == full


def test_lines_ask_for_logprobs_as_the_server_does(tmp_path, model):
    """A batch line takes logprobs and n as a request to the server does: completions' `logprobs: N`, chat's
    `logprobs` / `top_logprobs`, each value log_softmax of the model's logits at its token (1e-4); n choices."""
    from layerstream.engine.batch import run_batch

    lines = [req("t", prompt="Once upon", max_tokens=5, temperature=0, logprobs=2),
             req("c", CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
                 logprobs=True, top_logprobs=1),
             req("n", prompt="Once upon", max_tokens=3, temperature=0, n=2)]
    run_batch(model, write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", progress=False)
    t, c, n = (r["response"]["body"]["choices"][0] for r in read_records(tmp_path / "out.jsonl"))
    ids = model.tokenizer("Once upon")["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    ref = torch.log_softmax(model(out).logits[0].float(), -1)[len(ids) - 1:-1]
    new = out[0, len(ids):].tolist()
    assert len(t["logprobs"]["token_logprobs"]) == 5 and all(len(x) <= 2 for x in t["logprobs"]["top_logprobs"])
    assert all(abs(v - float(row[tok])) < 1e-4 for v, row, tok in zip(t["logprobs"]["token_logprobs"], ref, new))
    assert len(c["logprobs"]["content"]) == 4 and all(len(e["top_logprobs"]) == 1 for e in c["logprobs"]["content"])
    assert n["logprobs"] is None
    two = read_records(tmp_path / "out.jsonl")[2]["response"]["body"]
    assert [x["index"] for x in two["choices"]] == [0, 1] and two["choices"][0]["text"] == two["choices"][1]["text"]
    assert two["usage"]["completion_tokens"] == 6


def test_malformed_lines_become_error_records_and_the_job_goes_on(tmp_path, model):
    from layerstream.engine.batch import run_batch

    lines = [
        "not json at all",                                                         # 0 invalid_json
        json.dumps([1, 2]),                                                        # 1 not an object
        json.dumps({"method": "POST", "url": TEXT, "body": {"prompt": "x"}}),      # 2 no custom_id
        req("ok1", prompt="The sea", max_tokens=3, temperature=0),                 # 3 fine
        json.dumps({"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
        json.dumps({"custom_id": "g", "method": "GET", "url": TEXT, "body": {"prompt": "x"}}),
        json.dumps({"custom_id": "nb", "method": "POST", "url": TEXT}),           # 6 no body
        req("ok1", prompt="again", max_tokens=3),                                 # 7 duplicate custom_id
        req("np", max_tokens=3),                                                   # 8 no prompt
        req("nm", CHAT, messages="hi"),                                            # 9 messages not a list
        req("tt", prompt="x", temperature="hot"),                                  # 10 wrong type
        req("mt", prompt="x", max_tokens=0),                                       # 11 bad max_tokens
        req("long", prompt="word " * 60),                                          # 12 300 tokens > context 256
        req("big", prompt="x", max_tokens=1000),                                   # 13 too many tokens
        req("ok2", CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0),
    ]
    s = run_batch(model, write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", progress=False)
    assert s["requests"] == 15 and s["succeeded"] == 2 and s["failed"] == 13
    recs = read_records(tmp_path / "out.jsonl")
    assert len(recs) == 15
    codes = [r["error"]["code"] if r["error"] else None for r in recs]
    assert codes == ["invalid_json", "invalid_request", "invalid_request", None, "invalid_url", "invalid_request",
                     "invalid_request", "duplicate_custom_id", "missing_required_parameter", "invalid_value",
                     "invalid_value", "invalid_value", "context_length_exceeded", "context_length_exceeded", None]
    assert [r["custom_id"] for r in recs[:3]] == [None, None, None] and recs[7]["custom_id"] == "ok1"
    for r in recs:
        assert r["id"].startswith("batch_req_") and set(r) == {"id", "custom_id", "response", "error"}
        if r["error"] is None:
            assert r["response"]["status_code"] == 200
        elif r["error"]["code"] in ("invalid_json", "invalid_request", "invalid_url", "duplicate_custom_id"):
            assert r["response"] is None
        else:   # a request whose body is wrong: an HTTP 400 with OpenAI's error body
            assert r["response"]["status_code"] == 400
            err = r["response"]["body"]["error"]
            assert err["code"] == r["error"]["code"] and err["message"] == r["error"]["message"]
    assert "context is 256 tokens" in recs[12]["error"]["message"]


def test_changed_lines_are_redone_and_others_resumed(tmp_path, model, monkeypatch):
    """A journal left by a job that stopped before writing OUT: a rerun takes the finished records whose lines
    are unchanged, runs the changed line again, and writes what an uninterrupted run writes."""
    from layerstream.engine import batch

    lines = [req(f"r{k}", prompt=f"Line {k}:", max_tokens=5, temperature=0) for k in range(4)]
    src = write_lines(tmp_path / "in.jsonl", lines)
    def stop(*args):
        raise RuntimeError("stop here")

    monkeypatch.setattr(batch, "write_output", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        batch.run_batch(model, src, tmp_path / "out.jsonl", progress=False)
    monkeypatch.undo()
    journal = tmp_path / "out.jsonl.partial"
    assert len(journal.read_text().splitlines()) == 1 + 4
    lines[2] = req("r2", prompt="Something else", max_tokens=5, temperature=0)
    write_lines(src, lines)
    with open(journal, "ab") as f:   # a torn last line, as a kill in the middle of a write leaves
        f.write(b'{"i":3,"h":"00","r":{"id":')
    s = batch.run_batch(model, src, tmp_path / "out.jsonl", progress=False)
    assert (s["resumed"], s["ran"], s["succeeded"]) == (3, 1, 4)
    assert not journal.exists()
    batch.run_batch(model, src, tmp_path / "fresh.jsonl", progress=False)
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "fresh.jsonl").read_bytes()
    want, _ = greedy_text(model, model.tokenizer("Something else")["input_ids"], 5)
    assert read_records(tmp_path / "out.jsonl")[2]["response"]["body"]["choices"][0]["text"] == want


def test_a_second_job_on_the_same_output_is_refused(tmp_path, model):
    from layerstream.engine.batch import Journal, run_batch
    from layerstream.errors import InputError

    src = write_lines(tmp_path / "in.jsonl", [req("a", prompt="x", max_tokens=2)])
    held = Journal(tmp_path / "out.jsonl.partial", {"other": 1})
    try:
        with pytest.raises(InputError, match="another `layerstream batch`"):
            run_batch(model, src, tmp_path / "out.jsonl", progress=False)
    finally:
        held.close()
    with pytest.raises(InputError, match="no such input file"):
        run_batch(model, tmp_path / "missing.jsonl", tmp_path / "out.jsonl", progress=False)


def kill_9_once_journaled(cmd, journal, lines: int, env=None, timeout: float = 180) -> None:
    """Start `cmd` (a batch job) and SIGKILL it as soon as its journal holds `lines` lines."""
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and p.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.005)
        assert p.poll() is None, p.stderr.read().decode()[-3000:]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()


@pytest.mark.slow
def test_cli_kill_9_mid_job_then_rerun_gives_the_same_bytes(tmp_path, tiny_store, model):
    from layerstream.engine.batch import run_batch

    lines = [req(f"k{k}", prompt=f"Request number {k}", max_tokens=48, temperature=0) for k in range(7)]
    lines[3] = req("k3", CHAT, messages=[{"role": "user", "content": "Tell me"}], max_tokens=48, temperature=0.9)
    lines[5] = req("k5", prompt="Sampled", max_tokens=48, temperature=0.7, top_p=0.9, seed=42)
    lines.insert(6, "{broken")
    src = write_lines(tmp_path / "in.jsonl", lines)
    # the reference: one uninterrupted run (in this process; the same store, greedy and seeded)
    ref = tmp_path / "ref.jsonl"
    run_batch(model, src, ref, batch_size=2, progress=False)

    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.partial"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "layerstream", "batch", src, out, "--model", tiny_store, "--batch-size", "2",
           "--threads", "1"]
    kill_9_once_journaled(cmd, journal, 2, env=env)   # the header and one record
    assert not out.exists()
    done = [json.loads(line) for line in journal.read_bytes().split(b"\n")[1:-1]]   # the last: torn or empty
    finished = sum(1 for d in done if d["r"]["error"] is None)
    assert 1 <= finished < 7

    r = run_cli("batch", src, out, "--model", tiny_store, "--batch-size", "2", "--threads", "1", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming: {finished} of 8 requests already done" in r.stderr
    assert f"7 succeeded ({finished} resumed from an earlier run, {7 - finished} run now), 1 failed" in r.stderr
    assert "batch: 100%|" in r.stderr and "req/s" in r.stderr and "tok/s]" in r.stderr   # the progress bar
    assert out.read_bytes() == ref.read_bytes()
    assert not journal.exists() and not (tmp_path / "out.jsonl.tmp").exists()


def test_cli_errors_are_one_line(tmp_path):
    r = run_cli("batch", tmp_path / "none.jsonl", tmp_path / "out.jsonl", timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("layerstream: error:") and "no such input file" in r.stderr


def test_sampling_fields_left_out_come_from_the_models_defaults(model, tmp_path):
    """A body without sampling fields samples with the model's defaults (layerstream.sampling: here llama.cpp's,
    the tiny model's generation_config says nothing); temperature 0 is greedy with no penalty; the penalties and
    top_k / min_p a body sends are honoured; the server and batch jobs parse bodies alike (OpenAIRequests)."""
    from layerstream.engine.scheduler import Engine
    from layerstream.protocol import OpenAIRequests
    from layerstream.sampling import FALLBACK

    parser = OpenAIRequests(Engine(model), model.tokenizer, "tiny")

    def params(**body):
        return parser.request({"body": {"prompt": "abc", **body}}, {"kind": "text", "h": "0" * 64})[1]

    p = params()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == \
        (FALLBACK.temperature, FALLBACK.top_p, FALLBACK.top_k, FALLBACK.min_p, FALLBACK.repeat_penalty)
    assert p.seed is not None   # sampled without a seed: one from the line, so a rerun agrees
    g = params(temperature=0)
    assert g.greedy and g.repetition_penalty == 1.0 and g.top_k == 0
    s = params(temperature=0.5, top_k=-1, min_p=0.2, repetition_penalty=1.3, frequency_penalty=0.5,
               presence_penalty=-0.5)
    assert (s.temperature, s.top_k, s.min_p, s.repetition_penalty, s.frequency_penalty, s.presence_penalty) == \
        (0.5, 0, 0.2, 1.3, 0.5, -0.5)
    # through a job: penalties change a greedy line's text, and the same line gives the same record twice
    lines = [req("plain", prompt="aaaa", max_tokens=12, temperature=0),
             req("pen", prompt="aaaa", max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=2.0),
             req("sampled", prompt="aaaa", max_tokens=12)]
    from layerstream.engine.batch import run_batch

    outs = []
    for k in range(2):
        src = write_lines(tmp_path / f"in{k}.jsonl", lines)
        os.utime(src, (1_700_000_000, 1_700_000_000))   # `created` is the input's mtime: the same for both jobs
        run_batch(model, src, tmp_path / f"out{k}.jsonl", progress=False)
        outs.append((tmp_path / f"out{k}.jsonl").read_text())
    recs = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in read_records(tmp_path / "out0.jsonl")}
    assert recs["plain"] != recs["pen"]
    assert outs[0] == outs[1]


def test_a_chat_session_cut_back_to_the_common_prefix_answers_as_a_fresh_prompt(model):
    """ChatSession keeps the history's KV between turns; where the history's text tokenizes otherwise than the
    tokens generated (this tokenizer's multi-character pieces), the cache is cut back to the common prefix: each
    reply is then that of the whole conversation prefilled afresh."""
    from layerstream import ChatSession

    chat = ChatSession(model)
    for text in ["Hello there", "And again", "Once more"]:
        reply = chat.send(text, max_new_tokens=6, do_sample=False)
        ids = chat_ids(model, chat.messages[:-1])
        fresh = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):]
        assert reply == model.tokenizer.decode(fresh, skip_special_tokens=True)
    assert chat.last_prefill < len(ids)

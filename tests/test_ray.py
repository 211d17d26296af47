"""layerstream on Ray, on a real three-node Ray cluster made here (`ray.cluster_utils.Cluster`: a head and two
worker nodes on this machine, one CPU each, shared by the whole module): data-parallel batch jobs byte for byte
equal to one process, a replica killed with SIGKILL mid-job, the command line, Ray Data's `map_batches`; 2- and
3-stage layer pipelines of a dense and a MoE family against one process, a stage killed mid-generation."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import test_batch
from conftest import make_model_dir, make_moe_dir, run_cli, serving
from test_batch import CHAT, kill_9_once_journaled, req, write_lines

ray = pytest.importorskip("ray")
tiny_store, model = test_batch.tiny_store, test_batch.model   # its tiny model with a chat tokenizer, as fixtures


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    ray.init(address=c.address, logging_level="ERROR")
    yield c
    ray.shutdown()
    c.shutdown()


def job_lines(n: int, max_tokens: int):
    """Greedy and sampled requests, chat and text, and two lines that are not requests."""
    lines = [req(f"r{k}", prompt=f"Request number {k}:", max_tokens=max_tokens, temperature=0) for k in range(n)]
    lines[1] = req("r1", CHAT, messages=[{"role": "user", "content": "Tell me"}], max_tokens=max_tokens,
                   temperature=0.9)
    lines[3] = req("r3", prompt="Sampled", max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=42)
    lines.insert(4, "{broken")
    lines.insert(6, req("r2", prompt="a duplicate custom_id", max_tokens=2))
    lines.append(req("long", prompt="word " * 60))   # beyond the context: an error record made by a replica
    return lines


@pytest.mark.slow
def test_replicas_write_the_bytes_of_one_process(tmp_path, cluster, tiny_store, model):
    from layerstream.engine.batch import run_batch as run_here
    from layerstream.options import Options
    from layerstream.ray import run_batch

    src = write_lines(tmp_path / "in.jsonl", job_lines(10, 12))
    run_here(model, src, tmp_path / "one.jsonl", batch_size=2, progress=False)
    s = run_batch(tiny_store, src, tmp_path / "two.jsonl", Options(threads=1), replicas=2, batch_size=2,
                  progress=False)
    assert (s["requests"], s["succeeded"], s["failed"], s["replicas"], s["resubmitted"]) == (13, 10, 3, 2, 0)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not (tmp_path / "two.jsonl.partial").exists()


def actor_pids(cluster, cls: str) -> list[int]:
    """This cluster's processes whose title Ray set to one of an actor class's (ray::Replica, ray::Replica.run,
    ...): workers whose parent is one of its raylets (another Ray on this machine may run replicas too)."""
    raylets = {p.process.pid for node in cluster.list_all_nodes() for p in node.all_processes.get("raylet", [])}
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if not p.name.isdigit() or not (p / "cmdline").read_bytes().startswith(f"ray::{cls}".encode()):
                continue
            ppid = next(int(line.split()[1]) for line in (p / "status").read_text().splitlines()
                        if line.startswith("PPid:"))
            if ppid in raylets:
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_a_replica_killed_mid_job_costs_only_its_chunks(tmp_path, cluster, tiny_store, model):
    from layerstream.engine.batch import run_batch as run_here
    from layerstream.options import Options
    from layerstream.ray import run_batch

    src = write_lines(tmp_path / "in.jsonl", job_lines(16, 40))
    run_here(model, src, tmp_path / "one.jsonl", batch_size=2, progress=False)
    out, journal = tmp_path / "two.jsonl", tmp_path / "two.jsonl.partial"
    result = {}

    def job():
        try:
            result["summary"] = run_batch(tiny_store, src, out, Options(threads=1), replicas=2, batch_size=2,
                                          progress=False)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=job)
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline and t.is_alive():
        if journal.exists() and journal.read_bytes().count(b"\n") >= 4:   # the header, two error lines, a record
            break
        time.sleep(0.005)
    pids = actor_pids(cluster, "Replica")
    assert len(pids) == 2 and t.is_alive()
    os.kill(pids[0], signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive() and "error" not in result, result.get("error")
    s = result["summary"]
    assert s["resubmitted"] >= 1 and (s["succeeded"], s["failed"]) == (16, 3)
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    # nothing journaled twice: the output has each line once (the journal is gone, so count the records)
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()].count("r5") == 1


def test_bad_values_are_refused_before_any_replica_starts(tmp_path, cluster, tiny_store):
    from layerstream.errors import InputError
    from layerstream.options import Options
    from layerstream.ray import run_batch

    src = write_lines(tmp_path / "in.jsonl", [req("a", prompt="x", max_tokens=2)])
    with pytest.raises(InputError, match="the Ray cluster has 3"):
        run_batch(tiny_store, src, tmp_path / "out.jsonl", Options(), replicas=4, cpus=1, progress=False)
    with pytest.raises(InputError, match="replicas must be a positive integer"):
        run_batch(tiny_store, src, tmp_path / "out.jsonl", replicas=0, progress=False)


@pytest.mark.slow
def test_cli_batch_on_a_ray_cluster(tmp_path, cluster, tiny_store, model):
    from layerstream.engine.batch import run_batch as run_here

    src = write_lines(tmp_path / "in.jsonl", job_lines(6, 8))
    run_here(model, src, tmp_path / "one.jsonl", batch_size=4, progress=False)
    r = run_cli("batch", src, tmp_path / "out.jsonl", "--model", tiny_store, "--ray", cluster.address,
                "--replicas", "2", "--threads", "1", "--batch-size", "4", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting 2 replicas on Ray" in r.stderr and "batch: 100%|" in r.stderr
    assert "6 succeeded" in r.stderr and "3 failed" in r.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


@pytest.mark.slow
def test_a_killed_ray_driver_resumes_as_a_single_process_job(tmp_path, cluster, tiny_store, model):
    """kill -9 of `layerstream batch --ray` mid-job, then the same command without --ray: the journal's records
    are the same either way, so the rerun runs only what is missing and writes the bytes of one process."""
    from layerstream.engine.batch import run_batch as run_here

    src = write_lines(tmp_path / "in.jsonl", job_lines(12, 40))
    run_here(model, src, tmp_path / "one.jsonl", batch_size=2, progress=False)
    out, journal = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    cmd = [sys.executable, "-m", "layerstream", "batch", src, out, "--model", tiny_store, "--batch-size", "2",
           "--threads", "1"]
    kill_9_once_journaled(cmd + ["--ray", cluster.address, "--replicas", "2"], journal, 4)   # 2 errors, a record
    assert not out.exists()
    r = run_cli(*cmd[3:], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming: " in r.stderr
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_cli_without_ray_says_how_to_install_it(tmp_path):
    (tmp_path / "noray" / "ray").mkdir(parents=True)   # a `ray` that cannot be imported, first on the path
    (tmp_path / "noray" / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    src = write_lines(tmp_path / "in.jsonl", [req("a", prompt="x", max_tokens=2)])
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "noray"), *sys.path])}
    r = run_cli("batch", src, tmp_path / "out.jsonl", "--ray", env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "pip install 'layerstream[ray]'" in r.stderr.strip().splitlines()[-1]
    r = run_cli("batch", src, tmp_path / "out.jsonl", "--replicas", "2", timeout=120)
    assert r.returncode == 1 and "--replicas needs --ray" in r.stderr


@pytest.mark.slow
def test_ray_data_completions_match_generate(cluster, tiny_store, model):
    from layerstream.ray import Completions

    prompts = ["The sea is", "Once upon a time", "x", "1 2 3"]
    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    rows = ds.map_batches(Completions, fn_constructor_kwargs={"model": str(tiny_store), "max_tokens": 6,
                                                              "threads": 1},
                          concurrency=1, batch_size=2, num_cpus=1).take_all()
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:
        ids = model.tokenizer(r["prompt"])["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
        assert r["completion"] == model.tokenizer.decode(out, skip_special_tokens=True)
        assert (r["prompt_tokens"], r["completion_tokens"]) == (len(ids), len(out))


def test_completions_take_chat_messages(tiny_store, model):
    """The same class called in this process (as Ray Data calls it in its actors): a `messages` column."""
    from layerstream.errors import InputError
    from layerstream.ray import Completions

    chats = [[{"role": "user", "content": "Hi"}], [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Name a color."}]]
    complete = Completions(str(tiny_store), max_tokens=5, threads=1)
    got = complete({"messages": chats, "id": [7, 8]})
    assert got["id"] == [7, 8]
    for m, text, n in zip(chats, got["completion"], got["completion_tokens"]):
        ids = model.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):].tolist()
        assert text == model.tokenizer.decode(out, skip_special_tokens=True) and n == len(out)
    with pytest.raises(InputError, match="needs a 'prompt' or a 'messages' column"):
        complete({"text": ["x"]})


# -- the layer pipeline

@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A dense and a MoE family, 4 layers each, as stores."""
    from layerstream.store import resolve

    root = tmp_path_factory.mktemp("pipeline")
    return {"llama": resolve(make_model_dir(root / "llama", "llama", layers=4), store_path=root / "s-llama",
                             progress=False),
            "qwen2_moe": resolve(make_moe_dir(root / "qwen2_moe", "qwen2_moe", layers=4), store_path=root / "s-moe",
                                 progress=False)}


def test_stage_ranges_are_contiguous_and_balanced(stores):
    from layerstream.errors import InputError
    from layerstream.ray.pipeline import stage_ranges, stage_store
    from layerstream.store import Store

    store = Store(stores["qwen2_moe"])
    assert stage_ranges(store, 1) == [(0, 4)]
    assert stage_ranges(store, 2) == [(0, 2), (2, 4)] or stage_ranges(store, 2) == [(0, 3), (3, 4)]
    assert stage_ranges(store, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(InputError, match="at most one stage per layer"):
        stage_ranges(store, 5)
    first, last = stage_store(store, 0, 2, True, False), stage_store(store, 2, 4, False, True)
    names = [u.name for u in store.manifest.units]
    assert sorted(u.name for u in first.manifest.units + last.manifest.units) == sorted(names)
    assert "embed" in first.units and "head" not in first.units and "layer.1.expert.7" in first.units
    assert "head" in last.units and "layer.2.expert.0" in last.units and "layer.1" not in last.units


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_a_pipeline_gives_the_tokens_and_logits_of_one_process(cluster, stores, family):
    """2 stages fully resident, 3 stages streaming every layer (max_ram=0): logits and greedy tokens of one
    process; three prompts at once (in groups that share sweeps, one group or one per stage) give each prompt's
    own tokens, a row that ends early too."""
    from layerstream import AutoModel

    one = AutoModel.from_pretrained(stores[family], progress=False, threads=1)
    ids = torch.tensor([[1, 5, 9, 22, 7, 3, 44, 17, 90]])
    rows = torch.tensor([[1, 5, 9, 22, 7], [1, 80, 81, 2, 9], [1, 100, 3, 3, 64]])
    want_logits = one(ids).logits
    want = one.generate(ids, max_new_tokens=16, do_sample=False)
    want_rows = [one.generate(r[None], max_new_tokens=8, do_sample=False)[0].tolist() for r in rows]
    for n, budget in ((2, None), (3, 0)):
        pm = AutoModel.from_pretrained(stores[family], progress=False, threads=1, pipeline=n, max_ram=budget)
        try:
            assert len(pm.info) == n and [i["layers"] for i in pm.info] == pm.ranges
            assert len({i["pid"] for i in pm.info}) == n
            torch.testing.assert_close(pm(ids).logits, want_logits, rtol=1e-5, atol=1e-5)
            assert pm.generate(ids, max_new_tokens=16).tolist() == want.tolist()
            assert pm.last_stats["new_tokens"] == 16 and pm.last_stats["stages"] == n
            assert (pm.last_stats["bytes_per_token"] > 0) == (budget == 0)   # streamed only at max_ram=0
            for groups in (None, 1):   # a group per stage (here 2+1 or 1+1+1 rows), or all rows in one
                got = pm.generate(rows, max_new_tokens=8, eos_token_id=[], micro_batches=groups)
                assert got.tolist() == want_rows
            eos = want_rows[0][rows.shape[1] + 2]   # row 0 ends at its third token, the others go on
            got = pm.generate(rows, max_new_tokens=8, eos_token_id=[eos], pad_token_id=0).tolist()
            for r, g in zip(rows, got):
                w = one.generate(r[None], max_new_tokens=8, do_sample=False, eos_token_id=[eos],
                                 pad_token_id=0)[0].tolist()
                assert g[:len(w)] == w and set(g[len(w):]) <= {0}
            assert len(got[0]) > len(one.generate(rows[:1], max_new_tokens=8, do_sample=False, eos_token_id=[eos],
                                                  pad_token_id=0)[0])
        finally:
            pm.close()


class _KillAt:
    """A generate streamer that SIGKILLs a process when the n-th new token arrives."""

    def __init__(self, n: int, pid: int):
        self.n, self.pid, self.seen = n, pid, 0

    def put(self, ids):
        self.seen += 1
        if self.seen == self.n + 1:   # the first put is the prompt
            os.kill(self.pid, signal.SIGKILL)

    def end(self):
        pass


@pytest.mark.slow
def test_a_killed_stage_is_restarted_and_its_sequence_replayed(cluster, stores):
    from layerstream import AutoModel

    one = AutoModel.from_pretrained(stores["llama"], progress=False, threads=1)
    ids = torch.tensor([[1, 5, 9, 22, 7, 3, 44]])
    want = one.generate(ids, max_new_tokens=20, do_sample=False)
    pm = AutoModel.from_pretrained(stores["llama"], progress=False, threads=1, pipeline=2)
    try:
        pid = pm.info[1]["pid"]
        got = pm.generate(ids, max_new_tokens=20, streamer=_KillAt(6, pid))
        assert got.tolist() == want.tolist()
        assert pm.last_stats["restarts"] == 1 and pm.info[1]["pid"] != pid
    finally:
        pm.close()


@pytest.mark.slow
def test_a_pipeline_runs_a_lora_adapter_on_every_stage(cluster, stores, tmp_path):
    """Each stage hooks the adapter onto its own layers: the logits and greedy tokens of one process with it."""
    pytest.importorskip("peft")
    from test_lora import make_adapter

    from layerstream import AutoModel

    make_adapter(Path(stores["llama"]).parent / "llama", tmp_path / "adapter")
    one = AutoModel.from_pretrained(stores["llama"], progress=False, threads=1, adapter=str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 5, 9, 22, 7, 3, 44]])
    want_logits, want = one(ids).logits, one.generate(ids, max_new_tokens=10, do_sample=False)
    pm = AutoModel.from_pretrained(stores["llama"], progress=False, threads=1, pipeline=2,
                                   adapter=str(tmp_path / "adapter"))
    try:
        torch.testing.assert_close(pm(ids).logits, want_logits, rtol=1e-5, atol=1e-5)
        assert pm.generate(ids, max_new_tokens=10).tolist() == want.tolist()
    finally:
        pm.close()
        one.close()


# -- the engine over a pipeline: serve and batch across machines

SYSTEM = [1] + list(range(40, 60))   # a 21-token prefix shared by two prompts


@pytest.mark.slow
def test_the_engine_runs_over_a_pipeline(cluster, stores):
    """Engine(PipelineModel): requests share sweeps down 2 stages (on 2 of the cluster's nodes), each stage keeping
    its own layers' keys and values per sequence: every request gets one process's greedy tokens, a shared prefix
    is copied rather than computed again; a stage SIGKILLed while sequences run is restarted by Ray and every
    sequence replayed into the new stage's KV, nothing lost."""
    from layerstream import AutoModel
    from layerstream.engine.scheduler import Engine, SamplingParams

    one = AutoModel.from_pretrained(stores["llama"], progress=False, threads=1)
    prompts = [[1, 5, 9, 13], [1, 7, 3, 99, 45, 12, 8, 64, 33], [1, 20], SYSTEM + [5, 6], SYSTEM + [8, 9, 10]]
    limits = [6, 12, 9, 8, 8]
    want = [one.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            for p, n in zip(prompts, limits)]
    pm = AutoModel.from_pretrained(stores["llama"], progress=False, threads=1, pipeline=2)
    try:
        eng = Engine(pm, max_batch=3)
        assert eng.kv_layout == "slabs" and eng.kv_budget and not hasattr(pm, "plan")
        out = eng.generate(prompts, [SamplingParams(max_tokens=n) for n in limits])
        assert [c.token_ids for c in out] == want
        assert eng.stats["max_batch_seen"] == 3 and eng.stats["prefix_hit_tokens"] >= len(SYSTEM)
        assert eng.stats["prefill_tokens"] < sum(map(len, prompts))
        hs = [eng.submit(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts[1:4], limits[1:4])]
        eng.step()
        eng.step()
        pid = pm.info[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        while not all(h.done for h in hs):
            eng.step()
        assert [h.result().token_ids for h in hs] == want[1:4]
        assert pm.restarts == 1 and pm.info[1]["pid"] != pid
    finally:
        pm.close()
        one.close()


@pytest.mark.slow
def test_serve_and_batch_over_a_pipeline_on_the_cluster(tmp_path, cluster, tiny_store, model):
    """The command line across machines: `layerstream batch --pipeline 2 --ray ADDRESS` writes the bytes of a
    one-process job; `layerstream serve --pipeline 2 --ray ADDRESS` gives 4 concurrent clients of the real openai
    package one process's greedy text."""
    import openai

    from layerstream.engine.batch import run_batch as run_here

    src = write_lines(tmp_path / "in.jsonl", [req(f"r{k}", prompt=f"Request number {k}:", max_tokens=8,
                                                  temperature=0) for k in range(6)])
    run_here(model, src, tmp_path / "one.jsonl", batch_size=4, progress=False)
    r = run_cli("batch", src, tmp_path / "two.jsonl", "--model", tiny_store, "--pipeline", "2", "--ray",
                cluster.address, "--batch-size", "4", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 stages on Ray" in r.stderr
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()

    tok = model.tokenizer
    texts = [f"Question {k}:" for k in range(4)]
    want = []
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        want.append(tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:],
                               skip_special_tokens=True))
    with serving("--model", tiny_store, "--threads", "1", "--pipeline", "2", "--ray", cluster.address) as (url, out):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        name = c.models.list().data[0].id
        got = [None] * len(texts)

        def ask(i):
            got[i] = c.completions.create(model=name, prompt=texts[i], max_tokens=8, temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == want
    assert out["code"] == 0, "".join(out["lines"]) + out["rest"]


@pytest.mark.slow
def test_a_chat_over_a_pipeline_keeps_its_history_on_the_stages(tmp_path, cluster, tiny_store, model):
    """ChatSession over a 2-stage pipeline: each turn's reply is one process's, a later turn prefills only its new
    tokens (the history's keys and values stay on the stages), a stage restarted between turns costs a replay of
    the history, not a wrong reply; `layerstream chat --pipeline 2 --ray ADDRESS` answers as one process does."""
    from layerstream import AutoModel, ChatSession

    turns = ["Hello there", "And again", "Once more"]
    here = ChatSession(model)
    want = [here.send(t, max_new_tokens=6, do_sample=False) for t in turns]
    pm = AutoModel.from_pretrained(tiny_store, progress=False, threads=1, pipeline=2)
    try:
        chat = ChatSession(pm)
        assert chat.send(turns[0], max_new_tokens=6, do_sample=False) == want[0]
        first = chat.last_prefill
        assert chat.send(turns[1], max_new_tokens=6, do_sample=False) == want[1]
        assert 0 < chat.last_prefill < first + len(turns[1]) and chat.last_prefill < len(chat.cached_ids)
        pid = pm.info[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        for _ in range(240):   # Ray restarts it from the store, without the session's keys and values
            try:
                info = ray.get(pm.stages[1].ready.remote())
                if info["pid"] != pid:
                    break
            except ray.exceptions.RayActorError:
                pass
            time.sleep(0.5)
        assert chat.send(turns[2], max_new_tokens=6, do_sample=False) == want[2]
        chat.reset()
        assert chat.send(turns[0], max_new_tokens=6, do_sample=False) == want[0]
    finally:
        pm.close()
    r = run_cli("chat", "--model", tiny_store, "--pipeline", "2", "--ray", cluster.address, "--threads", "1",
                "--max-new-tokens", "6", "--temperature", "0", input=f"{turns[0]}\n{turns[1]}\n/exit\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2-stage pipeline" in r.stderr and want[0] in r.stdout and want[1] in r.stdout

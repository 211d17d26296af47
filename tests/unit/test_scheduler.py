"""The scheduler without a model: admission under the KV budget, the prefix cache, step records, over the slab KV
manager on a runner that holds no tensors (it records what the scheduler asks of it)."""

from layerstream.engine.cache import SlabCache
from layerstream.engine.requests import SamplingParams
from layerstream.engine.schedule import MIN_SHARE, Scheduler, Seq

PER = 10   # KV bytes per token


class Runner:
    """Holds token counts instead of keys and values."""

    def __init__(self):
        self.lens, self.limits, self.calls = {}, {}, []

    def limit(self, key, n):
        self.limits[key] = n

    def copy_prefix(self, key, src, m):
        self.calls.append(("copy", key, src, m))
        self.lens[key] = m

    def truncate(self, key, n):
        self.lens[key] = n

    def shrink(self, key):
        pass

    def free(self, key):
        self.calls.append(("free", key))
        self.lens.pop(key, None)
        self.limits.pop(key, None)

    def clear(self):
        self.calls.append(("clear",))
        self.lens.clear()
        self.limits.clear()

    def tokens(self):
        return sum(self.lens.values())

    capacity = tokens


def make(max_batch=4, budget=None, prefix=10_000, batched=True):
    runner = Runner()
    return Scheduler(SlabCache(runner), max_batch, batched, budget, PER, prefix), runner


def seq(slot, prompt, max_tokens=4, lslot=-1):
    return Seq(f"r{slot}", slot, list(prompt), SamplingParams(max_tokens=max_tokens), lslot=lslot)


def run_step(sched, runner, tokens=None):
    """What the engine does around the scheduler: admit, record, 'sweep' (the runner's lengths grow), a token per
    row; rows whose token limit is reached finish."""
    joining = sched.admit()
    step = sched.record(joining)
    for s, n in zip(step.rows, step.news):
        runner.lens[s.slot] = runner.lens.get(s.slot, 0) + len(n)
        s.tokens.append(tokens or 7)
    sched.drop([s for s in step.rows if len(s.tokens) >= s.params.max_tokens])
    return step


def test_requests_join_first_in_first_out_within_the_kv_budget():
    """A budget for 20 tokens: the first (8 + 4) runs, the second (6 + 4) does not fit beside it, and the third
    (2 + 2), which would fit, waits behind it: no request is overtaken, so none starves."""
    sched, runner = make(budget=20 * PER, prefix=0)
    a, b, c = seq(0, range(1, 9)), seq(1, range(1, 7)), seq(2, [1, 2], max_tokens=2)
    sched.waiting += [a, b, c]
    step = run_step(sched, runner)
    assert step.joining == [a] and sched.waiting == [b, c]
    assert step.news == [list(range(1, 9))] and a.real == 8 and runner.limits[0] == 12
    while a in sched.active:
        run_step(sched, runner)
    step = run_step(sched, runner)
    assert step.joining == [b, c] and sched.waiting == []


def test_at_most_max_batch_rows_and_one_at_a_time_when_not_batched():
    sched, runner = make(max_batch=2, prefix=0)
    sched.waiting += [seq(i, [1, 2, 3]) for i in range(3)]
    assert len(run_step(sched, runner).rows) == 2 and len(sched.waiting) == 1
    alone, runner = make(batched=False, prefix=0)
    alone.waiting += [seq(i, [1, 2, 3], max_tokens=2) for i in range(2)]
    assert [len(run_step(alone, runner).rows) for _ in range(4)] == [1, 1, 1, 1]


def test_a_step_record_feeds_prompts_then_last_tokens_and_drafts():
    sched, runner = make(prefix=0)
    a, b = seq(0, [1, 2, 3]), seq(1, [4, 5])
    sched.waiting += [a]
    run_step(sched, runner, tokens=9)
    sched.waiting += [b]
    a.drafted = [11, 12]
    step = sched.record(sched.admit())
    assert step.rows == [a, b] and step.news == [[9, 11, 12], [4, 5]]
    assert (a.real, b.real) == (6, 2)
    # the head's positions: every position of the verifying row a (its token and the two drafts), b's last
    assert step.last().tolist() == [0, 1, 2, 4]


def test_a_shared_prefix_is_lent_from_an_entry_and_counted():
    """A finished request stays as an entry; a later prompt that begins like it starts from its keys and values
    (copied: the runner is asked to), computes only the rest, and its last prompt token is always computed. Under
    MIN_SHARE common tokens, or for another adapter, nothing is lent."""
    system = list(range(100, 120))
    sched, runner = make()
    first = seq(0, system + [1], max_tokens=1)
    sched.waiting.append(first)
    run_step(sched, runner)
    assert list(sched.entries) == [0] and sched.cached_bytes() == (len(system) + 1) * PER
    again = seq(1, system + [1], max_tokens=1)   # the same prompt: all but its last token lent
    other = seq(2, system + [2, 3])
    sched.waiting += [again, other]
    step = run_step(sched, runner)
    assert ("copy", 1, 0, len(system)) in runner.calls and ("copy", 2, 0, len(system)) in runner.calls
    assert step.news == [[1], [2, 3]] and sched.prefix_hit_tokens == 2 * len(system)
    short = seq(3, system[:MIN_SHARE - 1] + [5, 6])
    lora = seq(4, system + [7], lslot=1)
    sched.waiting += [short, lora]
    step = run_step(sched, runner)
    assert [len(n) for n in step.news][-2:] == [MIN_SHARE + 1, len(system) + 1]


def test_requests_arriving_together_with_one_prefix_compute_it_once():
    """The first computes the shared prefix; the others wait one step and take it from the first."""
    system = list(range(100, 130))
    sched, runner = make(max_batch=8)
    rows = [seq(i, system + [i + 1, i + 2]) for i in range(4)]
    sched.waiting += rows
    assert run_step(sched, runner).joining == rows[:1]
    step = run_step(sched, runner)
    assert step.joining == rows[1:] and all(len(n) == 2 for n in step.news[1:])
    assert sched.prefix_hit_tokens == 3 * len(system)


def test_the_prefix_cache_keeps_its_budget_and_makes_room_for_new_requests():
    """Entries are kept least recently used first within the prefix budget; when the KV budget is short, entries
    are evicted before a request is made to wait. A failed row's KV goes, never kept."""
    sched, runner = make(prefix=25 * PER, budget=40 * PER)
    for i in range(3):
        sched.waiting.append(seq(i, [50 + i] * 10 + [i], max_tokens=1))
        run_step(sched, runner)
    assert list(sched.entries) == [1, 2] and sched.cached_bytes() <= 25 * PER   # 11 tokens each: two fit
    assert ("free", 0) in runner.calls
    big = seq(9, range(1, 30), max_tokens=4)   # 33 tokens: room for it only without the entries
    sched.waiting.append(big)
    assert run_step(sched, runner).joining == [big] and not sched.entries
    bad = seq(10, [1, 2])
    sched.waiting.append(bad)
    sched.record(sched.admit())
    sched.drop([], [bad])
    assert ("free", 10) in runner.calls and 10 not in sched.entries


def test_reset_drops_every_kv_but_keeps_the_queue():
    sched, runner = make()
    sched.waiting += [seq(0, [1, 2, 3]), seq(1, [4, 5, 6])]
    run_step(sched, runner)
    sched.waiting.append(seq(2, [7, 8]))
    assert runner.tokens() == 6
    sched.reset()
    assert not sched.active and not sched.entries and len(sched.waiting) == 1 and runner.tokens() == 0

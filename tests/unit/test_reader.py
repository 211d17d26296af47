"""layerstream.runtime.reader: reusable buffers (the pinned staging of an accelerator: a read fills one while
the other's copy runs), and several readers reading a unit as one does."""

import torch

from layerstream import AutoModel
from layerstream.runtime.profiler import Profiler
from layerstream.runtime.reader import BufferPool

from conftest import make_model_dir, reference


class Event:
    """A CUDA event as the pool sees it: done or not, and waited for."""

    def __init__(self, done: bool):
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def test_idle_buffer_first_then_a_second_then_the_oldest_waited_for():
    pool = BufferPool(torch.device("cpu"), pin=False, profiler=Profiler(False))
    a = pool.acquire_idle(4096, most=2)
    a[1] = Event(done=False)              # its copy to the device still runs
    pool.release(a)
    b = pool.acquire_idle(4096, most=2)   # not a: a second buffer, no wait
    assert b is not a and pool.prof.allocations == 2 and not a[1].waited
    b[1] = Event(done=True)
    pool.release(b)
    assert pool.acquire_idle(4096, most=2) is b   # b's copy is done: reused, not a
    b[1] = Event(done=False)
    pool.release(b)
    assert pool.acquire_idle(4096, most=2) is a and a[1].waited   # both busy, two made: the oldest, waited for
    assert pool.prof.allocations == 2
    c = pool.acquire_idle(8192, most=2)   # another size: a buffer of its own
    assert c[0].numel() == 8192 and pool.prof.allocations == 3


def test_one_staging_buffer_waits_for_its_copy():
    pool = BufferPool(torch.device("cpu"), pin=False, profiler=Profiler(False))
    a = pool.acquire_idle(4096, most=1)
    a[1] = Event(done=False)
    pool.release(a)
    assert pool.acquire_idle(4096, most=1) is a and a[1].waited and pool.prof.allocations == 1


def test_four_readers_stream_what_one_reads(tmp_path):
    """Buffered reads (page cache) in parallel chunks: the same logits and tokens as one reader, and as
    transformers; a CPU keeps one reader by default (its cores compute)."""
    src = make_model_dir(tmp_path / "src", "llama", layers=4)
    ids = torch.tensor([[1, 17, 33, 5]])
    ref = reference(src)
    out = {}
    for readers in (None, 1, 4):
        m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False, io="buffered",
                                      readers=readers)
        assert (m.streamer.reader.pool is None) == (readers != 4)
        out[readers] = (m(ids).logits, m.generate(ids, max_new_tokens=8, do_sample=False).tolist())
        m.close()
    assert torch.equal(out[1][0], out[4][0]) and torch.equal(out[None][0], out[4][0])
    assert out[1][1] == out[4][1] == out[None][1] == ref.generate(ids, max_new_tokens=8, do_sample=False).tolist()

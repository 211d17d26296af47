"""The KV cache `generate` and chat sessions use (engine/step.py `growing_cache`): transformers' DynamicCache whose
full-attention layers write new tokens into room kept at the end of their buffers instead of concatenating."""

import torch
from transformers import DynamicCache, LlamaConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from layerstream.engine.step import GROW, growing_cache, growing_layer_class


def config(**kw):
    return LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, **kw)


class Model:   # what growing_cache reads: a config
    def __init__(self, cfg):
        self.config = cfg


def kv(b=2, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 8, generator=g), torch.randn(b, 2, n, 8, generator=g)


def same(a, b):
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    assert a.get_seq_length() == b.get_seq_length()


def test_updates_crops_and_batch_changes_match_dynamic_cache():
    """Every step the keys and values are DynamicCache's exactly, through a prefill, decode steps past the
    room's end, crops (as speculative decoding and chat sessions crop), a batch selection, a repeat and a reset."""
    grow, ref = growing_cache(Model(config())), DynamicCache(config=config())
    assert all(type(layer) is growing_layer_class() for layer in grow.layers)
    seed = 0

    def step(n, b=2):
        nonlocal seed
        seed += 1
        for i in range(2):
            k, v = kv(b, n, seed * 10 + i)
            got = grow.update(k, v, i)
            want = ref.update(k, v, i)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    step(100)
    buf = grow.layers[0]._kbuf
    for _ in range(2 * GROW + 30):   # past the room: the buffer grows once
        step(1)
    assert grow.layers[0]._kbuf is not buf and grow.layers[0]._kbuf.shape[-2] >= grow.get_seq_length() + 1
    buf = grow.layers[0]._kbuf
    for _ in range(5):
        step(1)
    assert grow.layers[0]._kbuf is buf   # written in place
    grow.crop(-7), ref.crop(-7)
    same(grow, ref)
    step(3)
    same(grow, ref)
    assert grow.layers[0]._kbuf is buf   # the crop's tokens written over
    idx = torch.tensor([1])
    grow.batch_select_indices(idx), ref.batch_select_indices(idx)
    step(2, b=1)
    grow.batch_repeat_interleave(3), ref.batch_repeat_interleave(3)
    step(1, b=3)
    same(grow, ref)
    grow.reset(), ref.reset()
    assert grow.get_seq_length() == 0
    step(4, b=1)
    same(grow, ref)


def test_sliding_window_layers_stay_transformers_own():
    cfg = config(sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    cache = growing_cache(Model(cfg))
    assert type(cache.layers[0]) is DynamicSlidingWindowLayer and type(cache.layers[1]) is growing_layer_class()
    assert isinstance(cache.layers[1], DynamicLayer)

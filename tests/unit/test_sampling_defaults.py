"""layerstream.sampling: the model's generation_config where it says how to sample, else llama.cpp's defaults with
a repeat penalty; greedy is exact (no penalty unless asked); what a user sets wins."""

from transformers import GenerationConfig

from layerstream.sampling import FALLBACK, MIN_TEMPERATURE, choose, model_defaults


def test_a_config_that_says_nothing_gets_the_fallback():
    for g in (None, GenerationConfig(), GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)):
        assert model_defaults(g) == FALLBACK
    assert (FALLBACK.temperature, FALLBACK.top_p, FALLBACK.top_k, FALLBACK.min_p, FALLBACK.repeat_penalty) == \
        (0.8, 0.95, 40, 0.05, 1.1)


def test_the_models_own_settings_win_over_the_fallback():
    s = model_defaults(GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=20))
    assert (s.temperature, s.top_p, s.top_k) == (0.6, 0.9, 20)
    assert s.min_p == FALLBACK.min_p and "generation_config" in s.source
    assert model_defaults(GenerationConfig(repetition_penalty=1.3)).repeat_penalty == 1.3


def test_greedy_drops_the_penalty_unless_asked_and_explicit_options_win():
    d = FALLBACK
    for g in (choose(d, greedy=True), choose(d, temperature=0), choose(d, temperature=MIN_TEMPERATURE / 10)):
        assert g.greedy and g.repeat_penalty == 1.0
        assert g.generate_kwargs() == {"do_sample": False}
    assert choose(d, temperature=0, repeat_penalty=1.2).generate_kwargs() == \
        {"do_sample": False, "repetition_penalty": 1.2}
    s = choose(d, temperature=1.2, top_k=0)
    assert s.temperature == 1.2 and s.top_p == 0.95 and s.top_k == 0
    kw = s.generate_kwargs()
    assert kw["do_sample"] and kw["temperature"] == 1.2 and kw["top_k"] is None and kw["min_p"] == 0.05
    assert kw["repetition_penalty"] == 1.1

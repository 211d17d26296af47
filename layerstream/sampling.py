"""Sampling defaults like the ecosystem's: a model's own `generation_config` where it says how to sample, else
llama.cpp's defaults with a repeat penalty (as ollama's). Greedy (temperature 0) is exact: no penalty unless asked.

One place for `run`, `chat`, `serve` and batch jobs, so a prompt gets the same kind of answer from each."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8      # 0 = greedy
    top_p: float = 0.95
    top_k: int = 40               # 0 = off
    min_p: float = 0.05           # 0 = off
    repeat_penalty: float = 1.1   # 1 = off; divides positive logits of tokens already seen (transformers' rule)
    source: str = "llama.cpp's defaults, ollama's repeat penalty"   # where these came from, for the log

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def describe(self) -> str:
        if self.greedy:
            return "greedy" + (f", repeat penalty {self.repeat_penalty:g}" if self.repeat_penalty != 1 else "")
        return (f"temperature {self.temperature:g}, top_p {self.top_p:g}, top_k {self.top_k}, min_p {self.min_p:g}, "
                f"repeat penalty {self.repeat_penalty:g} ({self.source})")

    def generate_kwargs(self) -> dict:
        """transformers' `generate` arguments for these settings."""
        kw: dict = {"do_sample": not self.greedy}
        if not self.greedy:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None,
                      min_p=self.min_p or None)
        if self.repeat_penalty != 1:
            kw["repetition_penalty"] = self.repeat_penalty
        return kw


FALLBACK = Sampling()
MIN_TEMPERATURE = 1e-5   # below this, sampling is greedy (the logits / temperature would overflow)
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, source="greedy")


def model_defaults(generation_config) -> Sampling:
    """The model's sampling settings from its `generation_config` when it sets any (a checkpoint's
    generation_config.json with do_sample or a temperature), else `FALLBACK`. A model whose config says greedy
    (do_sample false and no temperature) also gets `FALLBACK`: transformers writes that default into every config."""
    if generation_config is None:
        return FALLBACK
    d = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else dict(generation_config)
    keys = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
    if not d.get("do_sample") and not (keys & d.keys()):
        return FALLBACK
    s = Sampling(source="the model's generation_config")
    if "temperature" in d and d["temperature"] is not None:
        s = replace(s, temperature=float(d["temperature"]))
    if d.get("do_sample") is False and "temperature" not in d:
        s = replace(s, temperature=0.0)
    for key, field in (("top_p", "top_p"), ("min_p", "min_p"), ("repetition_penalty", "repeat_penalty")):
        if d.get(key) is not None:
            s = replace(s, **{field: float(d[key])})
    if d.get("top_k") is not None:
        s = replace(s, top_k=int(d["top_k"]))
    return s


def choose(defaults: Sampling, temperature=None, top_p=None, top_k=None, min_p=None, repeat_penalty=None,
           greedy: bool = False) -> Sampling:
    """`defaults` with what a user set explicitly (None: not set). Greedy (`greedy`, or a temperature below
    `MIN_TEMPERATURE`, where dividing the logits by it would overflow) drops the repeat penalty unless it was set:
    greedy runs give the model's exact argmax tokens."""
    if greedy or (temperature is not None and temperature < MIN_TEMPERATURE):
        return replace(GREEDY, repeat_penalty=repeat_penalty if repeat_penalty is not None else 1.0)
    given = {k: v for k, v in dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                   repeat_penalty=repeat_penalty).items() if v is not None}
    return replace(defaults, **given, source=defaults.source + (" and the options given" if given else ""))

"""Constrained decoding: a request's tokens held to a grammar (a JSON schema, any JSON object, a regex), applied as
a token mask at each of its steps; other rows of the same sweep are not affected. Requests give it as OpenAI's
`response_format` (JSON) or vLLM's `structured_outputs` (a regex, a Lark or GBNF grammar, a choice, JSON).

The grammar engine is llguidance (Microsoft's; also what vLLM and SGLang offer): it compiles JSON schemas, regexes
and Lark grammars against the tokenizer's vocabulary and computes a step's mask in tens of microseconds on this
machine for the embedded model's 49,152 tokens (measured: 0.03 ms per mask; building its view of the tokenizer
once takes 0.4 s). Nothing here writes a grammar engine: this module only carries its matcher through the
engine's steps.
"""

from __future__ import annotations

import json

import torch

from ..errors import InputError

# JSON as `json.dumps` writes it (", " and ": ", no other whitespace): a model cannot run on in whitespace
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema(schema: dict | None = None) -> str:
    """The grammar of JSON text matching `schema` (None: any JSON object); InputError for what is not a schema."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                              defaults=COMPACT)
    except Exception as e:   # (llguidance's own errors say what is wrong)
        raise InputError(f"the JSON schema cannot be used: {e}") from None


FORMS = ("regex", "grammar", "choice", "json")   # vLLM's `structured_outputs` forms


def structured(value) -> str | None:
    """The grammar of vLLM's `structured_outputs` field: {"regex": pattern} (Rust regex syntax), {"grammar":
    a Lark or GBNF (llama.cpp) grammar}, {"choice": [strings]} or {"json": a JSON schema}; InputError for anything
    else. Compiled by llguidance's own converters."""
    import llguidance

    if value is None:
        return None
    forms = [k for k in FORMS if isinstance(value, dict) and value.get(k) is not None]
    if len(forms) != 1 or any(v is not None for k, v in value.items() if k not in FORMS):
        raise InputError("structured_outputs must be one of {\"regex\": ...}, {\"grammar\": ...}, {\"choice\": "
                         "[...]} or {\"json\": {...}}")
    kind, spec = forms[0], value[forms[0]]
    if kind == "json":
        if not isinstance(spec, dict):
            raise InputError("structured_outputs json must be a JSON schema object")
        return json_schema(spec)
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(x, str) and x for x in spec):
            raise InputError("structured_outputs choice must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", spec)
    if not isinstance(spec, str) or not spec:
        raise InputError(f"structured_outputs {kind} must be a non-empty string")
    try:
        return llguidance.grammar_from("regex" if kind == "regex" else "grammar", spec)
    except Exception as e:
        raise InputError(f"the {kind} cannot be used: {e}") from None


class Constraints:
    """The engine's grammar support for one tokenizer: made at the first constrained request."""

    def __init__(self, tokenizer):
        import llguidance.hf

        if tokenizer is None:
            raise InputError("constrained decoding needs the model's tokenizer; this store has none")
        import llguidance.torch as lt

        self.tok = llguidance.hf.from_tokenizer(tokenizer)
        self.vocab = self.tok.vocab_size
        self.bits = lt.allocate_token_bitmask(1, self.vocab)   # one step's mask, refilled per row (engine thread)

    def matcher(self, grammar: str):
        """A matcher for one sequence; InputError (what is wrong) for a grammar that does not compile."""
        import llguidance

        m = llguidance.LLMatcher(self.tok, grammar)
        if m.is_error():
            raise InputError(f"the response format cannot be used: {m.get_error()}")
        return m

    def mask(self, matcher, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [1, vocab] with every token the grammar does not allow next at -inf (the model's vocabulary
        may be wider than the tokenizer's: those extra ids are never allowed)."""
        import llguidance.torch as lt

        bits = self.bits
        lt.fill_next_token_bitmask(matcher, bits, 0)
        out = logits.float().clone()
        if out.shape[-1] > self.vocab:
            out[..., self.vocab:] = float("-inf")
        lt.apply_token_bitmask_inplace(out[..., :self.vocab], bits)
        return out

    @staticmethod
    def consume(matcher, tok: int) -> None:
        if not matcher.consume_token(tok):
            raise InputError(f"token {tok} is outside the request's grammar ({matcher.get_error()})")


def schema_of(response_format) -> str | None:
    """The grammar of an OpenAI `response_format` ({"type": "text"}, {"type": "json_object"}, or {"type":
    "json_schema", "json_schema": {"name", "schema", "strict"}}); InputError for anything else."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise InputError("response_format must be an object like {\"type\": \"json_object\"}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema(None)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InputError("response_format json_schema must be {\"name\": ..., \"schema\": {...}}")
        try:
            json.dumps(spec.get("schema", {}))
        except (TypeError, ValueError) as e:
            raise InputError(f"response_format's schema is not JSON: {e}") from None
        return json_schema(spec.get("schema") or {"type": "object"})
    raise InputError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema")

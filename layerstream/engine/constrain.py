"""Constrained decoding: a request's tokens held to a grammar (a JSON schema, any JSON object, a regex), applied as
a token mask at each of its steps; other rows of the same sweep are not affected.

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


def regex(pattern: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_regex(pattern)


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

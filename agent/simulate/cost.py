"""What one teacher call would cost at the configured Claude prices.

Tokens are estimated from the request the Claude backend would send, built with the
teacher's own prompt builders (agent.teacher.base): the system prompt and answer schema
(the stable prefix, cached after the first call) and the user turn (the email as
delimited data), plus the structured answer it would return. Claude's tokenizer is not
available offline: about 3.6 characters per token for English text and JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Sequence

from agent.teacher.base import Taxonomy, answer_schema, system_prompt, user_content
from agent.teacher.pricing import call_cost
from config import PriceTable
from storage.types import Email

CHARS_PER_TOKEN = 3.6
# A support reply of a few sentences, which the teacher writes when a reply is needed
# and the record carries none (Banking77 queries all need one).
DEFAULT_DRAFT_TOKENS = 120
# Answer skeleton: category, priority, needs_reply, a one-line rationale; then one
# {"category": ..., "probability": ...} entry per plausible category.
ANSWER_OVERHEAD_TOKENS = 50
PROB_ENTRY_TOKENS = 12


def tokens_of(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


@dataclass(frozen=True)
class CallCost:
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    usd: float


def prompt_prefix(categories: Mapping[str, str], priorities: Sequence[str]) -> str:
    """The stable part of every request: the teacher's system prompt and answer schema."""
    tax = Taxonomy(dict(categories), list(priorities))
    return system_prompt(tax) + "\n" + json.dumps(answer_schema(tax))


def user_tokens(subject: str, body: str, sender: str = "") -> int:
    """Tokens of the user turn the Claude backend sends for one email."""
    return tokens_of(user_content(Email(id="", subject=subject, text=body, new_text=body,
                                        from_addr=sender)))


class CostModel:
    """Prices teacher calls for one taxonomy.

    The system prompt is written to the prompt cache on the first call and read from it
    afterwards (5-minute TTL: a live cascade with sparse escalations may pay more writes;
    the replay has no clock, so both sides are priced with a warm cache after call one).
    """

    def __init__(self, prices: PriceTable, categories: Mapping[str, str], priorities: Sequence[str],
                 *, draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        self.prices = prices
        self.system_tokens = tokens_of(prompt_prefix(categories, priorities))
        self.draft_tokens = draft_tokens

    def call(self, subject: str, body: str, record: Mapping | None = None, *,
             cached: bool = True) -> CallCost:
        """Cost of asking the teacher about one email; ``cached``: system prompt in cache."""
        user = user_tokens(subject, body, (record or {}).get("from", ""))
        answer = ANSWER_OVERHEAD_TOKENS + PROB_ENTRY_TOKENS * max(
            1, len((record or {}).get("category_probs") or {}))
        if record is not None and record.get("draft"):
            answer += tokens_of(record["draft"])
        elif record is None or record.get("needs_reply") is not False:
            answer += self.draft_tokens
        cache_read, cache_write = ((self.system_tokens, 0) if cached
                                   else (0, self.system_tokens))
        usd = call_cost(self.prices, input_tokens=user, output_tokens=answer,
                        cache_read_tokens=cache_read, cache_write_tokens=cache_write)
        return CallCost(user, answer, cache_read, cache_write, usd)

"""What a teacher call costs, from its usage fields, and what N calls will cost.

Anthropic bills four kinds of input separately: ``input_tokens`` (uncached),
``cache_creation_input_tokens`` (prompt-cache writes, 1.25x input for the 5-minute TTL),
``cache_read_input_tokens`` (cache hits, 0.1x input or less) and ``output_tokens``. The
Message Batches API halves all of them (``batch_discount``).

>>> from config import PriceTable
>>> t = PriceTable(input=3, output=15, cache_write=3.75, cache_read=0.3)
>>> round(call_cost(t, input_tokens=1000, output_tokens=200, cache_write_tokens=2000), 6)
0.0135
"""

from __future__ import annotations

from config import PriceTable

CHARS_PER_TOKEN = 4.0          # English prose; a fair planning figure for email
SYSTEM_PROMPT_TOKENS = 900     # taxonomy, instructions and the output schema, per call
OUTPUT_TOKENS = 220            # one answer: labels, probabilities, a short draft
MIN_CACHEABLE_TOKENS = 1024    # the API caches no shorter prefix (Sonnet; 4096 on some)


def call_cost(table: PriceTable, *, input_tokens: int = 0, output_tokens: int = 0,
              cache_read_tokens: int = 0, cache_write_tokens: int = 0,
              batch: bool = False) -> float:
    """USD for one call's usage under ``table`` (prices per million tokens)."""
    usd = (input_tokens * table.input + output_tokens * table.output
           + cache_write_tokens * table.cache_write
           + cache_read_tokens * table.cache_read) / 1_000_000
    return usd * (table.batch_discount if batch else 1.0)


def estimate_cost(n_emails: int, avg_chars: float, price_table: PriceTable, *,
                  k: int = 1, batch: bool = False, cached_system: bool = True,
                  system_tokens: int = SYSTEM_PROMPT_TOKENS,
                  output_tokens: int = OUTPUT_TOKENS) -> float:
    """Planning estimate in USD for labelling ``n_emails`` of ``avg_chars`` characters.

    ``k`` samples per email (self-consistency). With ``cached_system`` the system prompt
    is written to the cache once and read on every later call; a system prompt below the
    API's minimum cacheable length is never cached, so this is a lower bound there.

    >>> from config import PriceTable
    >>> round(estimate_cost(100, 2000, PriceTable(), cached_system=False), 4)
    0.75
    """
    calls = max(0, n_emails) * max(1, k)
    if calls == 0:
        return 0.0
    email_tokens = int(avg_chars / CHARS_PER_TOKEN)
    if cached_system:
        usd = call_cost(price_table, input_tokens=email_tokens * calls,
                        output_tokens=output_tokens * calls,
                        cache_write_tokens=system_tokens,
                        cache_read_tokens=system_tokens * (calls - 1), batch=batch)
    else:
        usd = call_cost(price_table, input_tokens=(email_tokens + system_tokens) * calls,
                        output_tokens=output_tokens * calls, batch=batch)
    return usd

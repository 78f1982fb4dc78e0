"""Structured logs: one JSON object per line on stdout, with card data kept out (STYLE.md).

The last processor before rendering masks anything that looks like a card number (13-19
digits) in every value, and drops keys that may carry track data, PIN blocks or keys. It runs
on every line, so a careless `log.info(card=...)` still prints only the first 6 and last 4.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from cardcodec.cards import mask_card_number

CARD_PATTERN = re.compile(r"(?<!\d)\d{13,19}(?!\d)")
SECRET_KEYS = frozenset(
    {"track", "track2", "pin", "pin_block", "key", "keys", "tmk", "pik", "mak", "tdk", "frame"}
)


def _mask_text(text: str) -> str:
    return CARD_PATTERN.sub(lambda match: mask_card_number(match.group(0)), text)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: ("<hidden>" if k in SECRET_KEYS else _clean(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value


def protect_card_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask card numbers and hide secrets in every value of a log line."""
    for key in list(event_dict):
        if key in SECRET_KEYS:
            event_dict[key] = "<hidden>"
        else:
            event_dict[key] = _clean(event_dict[key])
    return event_dict


def configure(stream: TextIO = sys.stdout, level: int = logging.INFO) -> None:
    """JSON lines on `stream`: time, level, event and the line's own keys."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            protect_card_data,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )

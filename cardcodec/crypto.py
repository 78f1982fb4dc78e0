"""Card cryptography of the POS profile (pos-8583.md §5) for both key suites."""

from __future__ import annotations

import enum


class Suite(enum.Enum):
    """A terminal's key suite; the value is the config's spelling."""

    TDES = "3des"
    SM4 = "sm4"

    @property
    def block_size(self) -> int:
        return 8 if self is Suite.TDES else 16

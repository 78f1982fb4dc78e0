"""What the acquirer runs on a settlement file: everything checkable from the file, its `.sig`
and the issuer's public key alone, with no access to the issuer's ledger (§6).

One pass over the file, a record at a time, checks each record's length, type and fields,
the order of the records and of the details, each detail's own arithmetic (net = settled -
fee; for redemptions, voids and reversals the settled amount and points that follow from the
list amount and discount), every merchant record's counts and totals and the trailer's
against the details, the trailer's SHA-256, and the Ed25519 signature, whose hash is fed in
the same pass. Memory holds one record and one running total per merchant.

Every fault found is reported, by line, record and position, up to a bound (a file mangled
throughout would otherwise print a million lines); the count is always exact.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from clearing import ed25519
from clearing.layout import (
    RECORD_LENGTH,
    Detail,
    Header,
    MerchantRecord,
    Trailer,
    parse_detail,
    parse_header,
    parse_merchant,
    parse_trailer,
    signature_name,
)
from clearing.money import Totals
from clearing.signing import raw_public
from gateway.points import MAX_DISCOUNT_BP, points_for, settled_fen

MAX_FAULTS_KEPT = 200
_SIGNATURE_RE = re.compile(rb"[0-9a-f]{128}\n")
_NAME_RE = re.compile(r"VIPSETTLE_([A-Za-z0-9]+)_([0-9]{6})_([0-9]{3})\.txt")
# A reversal (04) may carry either sign; the other types one each.
_SIGN_OF_TYPE = {"22": 1, "25": -1, "23": -1}
# Which record types may come next, at each stage of the file (§6's order).
_ALLOWED_NEXT: dict[str, frozenset[str]] = {
    "start": frozenset("H"),
    "details": frozenset("DMT"),
    "merchants": frozenset("MT"),
    "end": frozenset(),
}


@dataclass
class Verification:
    """The outcome: every fault (the first `MAX_FAULTS_KEPT` kept), and the figures read."""

    path: Path
    faults: list[str] = field(default_factory=list)
    fault_count: int = 0
    header: Header | None = None
    trailer: Trailer | None = None
    totals: Totals = field(default_factory=Totals)
    merchant_count: int = 0
    # The merchant records as read (one per merchant: bounded by the merchants, not entries).
    merchant_records: list[MerchantRecord] = field(default_factory=list)
    sha256: str = ""
    signature_good: bool = False

    @property
    def good(self) -> bool:
        return self.fault_count == 0

    def fault(self, message: str) -> None:
        self.fault_count += 1
        if len(self.faults) < MAX_FAULTS_KEPT:
            self.faults.append(message)


def verify_file(
    path: Path,
    public_key: Ed25519PublicKey,
    on_detail: Callable[[Detail], None] | None = None,
) -> Verification:
    """Check a settlement file and the `.sig` beside it against the issuer's public key.

    `on_detail`, when given, receives every detail record read (in file order), so that a
    caller can compare the file with something else in the same pass.
    """
    result = Verification(path)
    signature = _read_signature(path, result)
    public = raw_public(public_key)
    reader = _Reader(result, ed25519.challenge_hash(public, signature or bytes(64)), on_detail)
    try:
        with path.open("rb") as file:
            reader.read(file)
    except OSError as error:
        result.fault(f"{path}: cannot read it: {error.strerror}")
        return result
    reader.finish()
    _check_name(path, result)
    if signature is not None:
        result.signature_good = ed25519.verify_prehashed(public, signature, reader.challenge)
        if not result.signature_good:
            result.fault(f"{signature_name(path.name)}: the signature does not verify")
    return result


def _read_signature(path: Path, result: Verification) -> bytes | None:
    sig_path = path.with_name(signature_name(path.name))
    try:
        data = sig_path.read_bytes()[:1024]
    except OSError as error:
        result.fault(f"{sig_path.name}: cannot read it: {error.strerror}")
        return None
    if not _SIGNATURE_RE.fullmatch(data):
        result.fault(f"{sig_path.name}: not 128 lower-case hex characters and a newline")
        return None
    return bytes.fromhex(data[:128].decode("ascii"))


def _check_name(path: Path, result: Verification) -> None:
    """A file still under its §6 name must agree with its header."""
    match = _NAME_RE.fullmatch(path.name)
    header = result.header
    if match is None or header is None:
        return
    named = (match[1], match[2], match[3])
    if named != (header.receiver_id, header.month, header.sequence):
        result.fault(
            f"{path.name}: the name says acquirer {match[1]}, month {match[2]}, sequence "
            f"{match[3]}; the header says {header.receiver_id}, {header.month}, "
            f"{header.sequence}"
        )


class _Reader:
    """The state of one pass: where in the file, what came before, running totals."""

    def __init__(
        self,
        result: Verification,
        challenge: hashlib._Hash,
        on_detail: Callable[[Detail], None] | None,
    ) -> None:
        self.result = result
        self.challenge = challenge
        self.on_detail = on_detail
        self.before = hashlib.sha256()
        self.whole = hashlib.sha256()
        self.line_number = 0
        self.stage = "start"  # start, details, merchants, end
        self.previous: Detail | None = None
        self.merchants: dict[str, Totals] = {}
        self.merchant_order: list[str] = []
        self.last_merchant_record: str | None = None

    def read(self, file: BinaryIO) -> None:
        while raw := file.readline(RECORD_LENGTH + 1):
            self.line_number += 1
            before_this = self.before.hexdigest() if raw[:1] == b"T" else ""
            for digest in (self.before, self.whole, self.challenge):
                digest.update(raw)
            record = self._record(raw)
            if record is not None:
                self._dispatch(record, before_this)

    def fault(self, problem: str, kind: str = "") -> None:
        where = f"line {self.line_number}" + (f" ({kind} record)" if kind else "")
        self.result.fault(f"{where}: {problem}")

    def _record(self, raw: bytes) -> str | None:
        """The record without its newline, or None (after a fault) when it cannot be read."""
        if not raw.endswith(b"\n"):
            if len(raw) > RECORD_LENGTH:
                self.fault(f"longer than {RECORD_LENGTH} characters")
                return None
            self.fault("does not end with a newline")
        body = raw.rstrip(b"\n")
        if len(body) != RECORD_LENGTH:
            self.fault(f"{len(body)} characters, not {RECORD_LENGTH}")
            return None
        if not body.isascii():
            self.fault("not ASCII")
            return None
        return body.decode("ascii")

    def _dispatch(self, record: str, before_this: str) -> None:
        kind = record[0]
        allowed = _ALLOWED_NEXT[self.stage]
        if kind not in allowed:
            expected = " or ".join(sorted(allowed)) or "nothing (after the trailer)"
            self.fault(f"a {kind!r} record where {expected} belongs")
            return
        if kind == "H":
            self._header(record)
        elif kind == "D":
            self._detail(record)
        elif kind == "M":
            self._merchant(record)
        else:
            self._trailer(record, before_this)

    def _faults_of(self, kind: str, faults: list[str]) -> None:
        for problem in faults:
            self.fault(problem, kind)

    def _header(self, record: str) -> None:
        faults: list[str] = []
        self.result.header = parse_header(record, faults)
        self._faults_of("H", faults)
        self.stage = "details"

    def _detail(self, record: str) -> None:
        faults: list[str] = []
        detail = parse_detail(record, faults)
        self._faults_of("D", faults)
        expected_sequence = self.previous.sequence + 1 if self.previous else 1
        if detail.sequence != expected_sequence:
            self.fault(f"sequence {detail.sequence}, expected {expected_sequence}", "D")
        if self.previous is not None and detail.order_key() <= self.previous.order_key():
            self.fault("out of order (merchant, business date, terminal, batch, trace)", "D")
        self._detail_figures(detail)
        self.previous = detail
        totals = self.merchants.get(detail.merchant_id)
        if totals is None:
            totals = self.merchants[detail.merchant_id] = Totals()
            self.merchant_order.append(detail.merchant_id)
        totals.add_detail(detail)
        if self.on_detail is not None:
            self.on_detail(detail)

    def _detail_figures(self, detail: Detail) -> None:
        """What a detail's own fields must satisfy."""
        header = self.result.header
        month = f"{detail.business_date.year:04d}{detail.business_date.month:02d}"
        if header is not None and detail.business_date != date.min and month != header.month:
            self.fault(f"business date {detail.business_date} is not in the file's month", "D")
        sign = _SIGN_OF_TYPE.get(detail.entry_type)
        if sign is not None and detail.settled_fen * sign < 0:
            self.fault(f"type {detail.entry_type} with a settled amount of that sign", "D")
        if detail.fee_fen * detail.settled_fen < 0 or abs(detail.fee_fen) > abs(detail.settled_fen):
            self.fault("the fee is not a part of the settled amount with its sign", "D")
        if detail.net_fen != detail.settled_fen - detail.fee_fen:
            self.fault("net is not settled - fee", "D")
        if detail.entry_type != "25" and detail.discount_bp <= MAX_DISCOUNT_BP:
            settled = settled_fen(detail.list_amount_fen, detail.discount_bp)
            if abs(detail.settled_fen) != settled:
                self.fault(f"settled amount is not {settled} (list amount and discount)", "D")
            elif detail.points != points_for(settled):
                self.fault(f"points are not {points_for(settled)} (ceil(D / 2))", "D")

    def _merchant(self, record: str) -> None:
        faults: list[str] = []
        merchant = parse_merchant(record, faults)
        self._faults_of("M", faults)
        self.stage = "merchants"
        self.result.merchant_count += 1
        if (
            self.last_merchant_record is not None
            and merchant.merchant_id <= self.last_merchant_record
        ):
            self.fault(f"merchant {merchant.merchant_id} out of order", "M")
        self.last_merchant_record = merchant.merchant_id
        self.result.merchant_records.append(merchant)
        totals = self.merchants.pop(merchant.merchant_id, None)
        if totals is None:
            self.fault(f"merchant {merchant.merchant_id} has no details", "M")
            return
        self.result.totals.merge(totals)
        self._compare_merchant(merchant, totals)

    def _compare_merchant(self, merchant: MerchantRecord, totals: Totals) -> None:
        pairs = (
            ("redemption count", merchant.redemption_count, totals.redemption_count),
            ("redemptions settled", merchant.redemptions_fen, totals.redemptions_fen),
            ("other count", merchant.other_count, totals.other_count),
            ("others settled", merchant.others_fen, totals.others_fen),
            ("fees", merchant.fees_fen, totals.fees_fen),
            ("net payable", merchant.net_fen, totals.net_fen),
        )
        for name, stated, summed in pairs:
            if stated != summed:
                self.fault(
                    f"merchant {merchant.merchant_id}: {name} {stated}, its details give {summed}",
                    "M",
                )

    def _trailer(self, record: str, before_this: str) -> None:
        for totals in self.merchants.values():  # details without a merchant record
            self.result.totals.merge(totals)
        faults: list[str] = []
        trailer = parse_trailer(record, faults)
        self._faults_of("T", faults)
        self.result.trailer = trailer
        self.stage = "end"
        totals = self.result.totals
        pairs = (
            ("detail count", trailer.detail_count, totals.count),
            ("merchant count", trailer.merchant_count, self.result.merchant_count),
            ("total settled", trailer.settled_fen, totals.settled_fen),
            ("total fees", trailer.fees_fen, totals.fees_fen),
            ("total net", trailer.net_fen, totals.net_fen),
        )
        for name, stated, summed in pairs:
            if stated != summed:
                self.fault(f"{name} {stated}, the records give {summed}", "T")
        if trailer.sha256 != before_this:
            self.fault("the SHA-256 is not that of the bytes before the trailer", "T")

    def finish(self) -> None:
        if self.stage != "end":
            self.result.fault(f"{self.result.path.name}: no trailer at the end of the file")
        for merchant_id in self.merchants:
            self.result.fault(f"merchant {merchant_id} has details but no merchant record")
        self.result.sha256 = self.whole.hexdigest()

"""A POS terminal written from pos-8583.md alone, for the gateway's tests.

It shares no code with `cardcodec`: its own field table, BCD packing, MAC, key unwrapping, PIN
block and track encryption, straight from the spec's §1-§5. A gateway that agrees with this
terminal and with the known-answer vectors agrees with the spec, not merely with itself.
"""

from __future__ import annotations

import hmac
import socket
from dataclasses import dataclass, field

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# §2: number -> (format, length prefix bytes (0 fixed), max length)
TABLE: dict[int, tuple[str, int, int]] = {
    2: ("n", 1, 19), 3: ("n", 0, 6), 4: ("n", 0, 12), 11: ("n", 0, 6), 12: ("n", 0, 6),
    13: ("n", 0, 4), 14: ("n", 0, 4), 15: ("n", 0, 4), 22: ("nl", 0, 3), 25: ("n", 0, 2),
    26: ("n", 0, 2), 32: ("n", 1, 11), 35: ("z", 1, 37), 37: ("a", 0, 12), 38: ("a", 0, 6),
    39: ("a", 0, 2), 41: ("a", 0, 8), 42: ("a", 0, 15), 48: ("n", 2, 322), 49: ("a", 0, 3),
    52: ("b", 0, 8), 53: ("n", 0, 16), 54: ("a", 2, 20), 60: ("n", 2, 17), 61: ("n", 2, 29),
    62: ("b", 2, 512), 63: ("a", 2, 163), 64: ("b", 0, 8),
}  # fmt: skip

TPDU_REQUEST = bytes.fromhex("6000030000")
HEADER = bytes.fromhex("603100310000")


def _bcd_length(length: int, width: int) -> bytes:
    return bytes.fromhex(f"{length:0{width * 2}d}")


def pack(number: int, value: str | bytes) -> bytes:
    kind, prefix, _ = TABLE[number]
    if kind == "b":
        assert isinstance(value, bytes)
        return (_bcd_length(len(value), prefix) if prefix else b"") + value
    assert isinstance(value, str)
    if kind in ("n", "nl", "z"):
        digits = value.replace("=", "D")
        if len(digits) % 2:
            right_aligned = kind == "n" and prefix == 0
            digits = "0" + digits if right_aligned else digits + "0"
        return (_bcd_length(len(value), prefix) if prefix else b"") + bytes.fromhex(digits)
    data = value.encode("ascii")
    return (_bcd_length(len(data), prefix) if prefix else b"") + data


def unpack(number: int, data: bytes, offset: int) -> tuple[str | bytes, int]:
    kind, prefix, size = TABLE[number]
    length = int(data[offset : offset + prefix].hex()) if prefix else size
    offset += prefix
    if kind == "b":
        return data[offset : offset + length], offset + length
    if kind in ("n", "nl", "z"):
        width = (length + 1) // 2
        digits = data[offset : offset + width].hex().upper()
        right_aligned = kind == "n" and prefix == 0 and length % 2
        text = digits[1:] if right_aligned else digits[:length]
        return text, offset + width
    return data[offset : offset + length].decode("ascii"), offset + length


def build(mti: str, fields: dict[int, str | bytes], tpdu: bytes = TPDU_REQUEST) -> bytes:
    """The payload (TPDU onwards) of a message with those fields, in ascending order."""
    bitmap = 0
    body = b""
    for number in sorted(fields):
        bitmap |= 1 << (64 - number)
        body += pack(number, fields[number])
    return tpdu + HEADER + bytes.fromhex(mti) + bitmap.to_bytes(8, "big") + body


def parse(payload: bytes) -> tuple[str, dict[int, str | bytes], bytes, bytes]:
    """MTI, fields, TPDU and header of a payload."""
    tpdu, header = payload[:5], payload[5:11]
    mti = payload[11:13].hex()
    bitmap = int.from_bytes(payload[13:21], "big")
    offset = 21
    fields: dict[int, str | bytes] = {}
    for number in range(2, 65):
        if bitmap & (1 << (64 - number)):
            fields[number], offset = unpack(number, payload, offset)
    assert offset == len(payload), "bytes after the last field"
    return mti, fields, tpdu, header


def _cipher(suite: str, key: bytes) -> Cipher[modes.ECB]:
    if suite == "3des":
        return Cipher(TripleDES(key + key[:8]), modes.ECB())
    return Cipher(algorithms.SM4(key), modes.ECB())


def encrypt(suite: str, key: bytes, data: bytes) -> bytes:
    encryptor = _cipher(suite, key).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def decrypt(suite: str, key: bytes, data: bytes) -> bytes:
    decryptor = _cipher(suite, key).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def mac(suite: str, mak: bytes, data: bytes) -> bytes:
    """§5.1: zero-pad, XOR the blocks, hex, two encryptions, first 8 hex characters."""
    block = 8 if suite == "3des" else 16
    data = data + bytes(-len(data) % block)
    result = bytes(block)
    for start in range(0, len(data), block):
        result = bytes(a ^ b for a, b in zip(result, data[start : start + block], strict=True))
    text = result.hex().upper().encode()
    left, right = text[:block], text[block:]
    first = encrypt(suite, mak, left)
    final = encrypt(suite, mak, bytes(a ^ b for a, b in zip(first, right, strict=True)))
    return final.hex().upper()[:8].encode()


def pin_block(suite: str, pik: bytes, pin: str, card: str) -> bytes:
    """§5.3: ISO 9564 format 0, encrypted under the PIK (SM4: 8 zero bytes appended)."""
    pin_field = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))  # the length: one nibble
    pan_field = bytes.fromhex("0000" + card[:-1][-12:])
    clear = bytes(a ^ b for a, b in zip(pin_field, pan_field, strict=True))
    return encrypt(suite, pik, clear if suite == "3des" else clear + bytes(8))


def encrypt_track(suite: str, tdk: bytes, track: str) -> str:
    """§5.4: the B bytes before the last byte of the packed track, encrypted."""
    block = 8 if suite == "3des" else 16
    packed = bytearray(bytes.fromhex(track + ("0" if len(track) % 2 else "")))
    start = len(packed) - 1 - block
    packed[start:-1] = encrypt(suite, tdk, bytes(packed[start:-1]))
    return packed.hex().upper()[: len(track)]


@dataclass
class Answer:
    mti: str
    fields: dict[int, str | bytes]
    tpdu: bytes
    header: bytes
    payload: bytes

    @property
    def code(self) -> str:
        value = self.fields[39]
        assert isinstance(value, str)
        return value

    def text(self, number: int) -> str:
        value = self.fields[number]
        assert isinstance(value, str)
        return value

    @property
    def points(self) -> int:
        return int(self.text(63)[3:13])

    @property
    def balance(self) -> int:
        return int(self.text(63)[13:23])

    @property
    def discount_bp(self) -> int:
        return int(self.text(63)[23:27])

    @property
    def cash_fen(self) -> int:
        return int(self.text(63)[27:39])


@dataclass
class SpecTerminal:
    """One terminal's state: keys, trace, batch; builds requests and checks answers."""

    terminal_id: str
    merchant_id: str
    suite: str
    tmk: bytes
    trace: int = 0
    batch: str = "000001"
    pik: bytes = b""
    mak: bytes = b""
    tdk: bytes | None = None
    sent: list[bytes] = field(default_factory=list)

    def next_trace(self) -> str:
        self.trace = self.trace % 999999 + 1
        return f"{self.trace:06d}"

    def ids(self) -> dict[int, str | bytes]:
        return {41: self.terminal_id, 42: self.merchant_id}

    def signed(self, mti: str, fields: dict[int, str | bytes]) -> bytes:
        fields = dict(fields)
        fields[64] = bytes(8)
        payload = build(mti, fields)
        return payload[:-8] + mac(self.suite, self.mak, payload[11:-8])

    def sign_on(self, with_tdk: bool = False) -> bytes:
        code = {("3des", False): "003", ("3des", True): "004", ("sm4", False): "005"}.get(
            (self.suite, with_tdk), "006"
        )
        fields = {11: self.next_trace(), **self.ids(), 60: f"00{self.batch}{code}", 63: "01 "}
        return build("0800", fields)

    def adopt_sign_on(self, answer: Answer) -> None:
        """Take the working keys of field 62 (checking their KCVs) and the batch of 60.2."""
        field62 = answer.fields[62]
        assert isinstance(field62, bytes)
        keys = []
        for start in range(0, len(field62), 20):
            key = decrypt(self.suite, self.tmk, field62[start : start + 16])
            kcv = encrypt(self.suite, key, bytes(8 if self.suite == "3des" else 16))[:4]
            assert hmac.compare_digest(kcv, field62[start + 16 : start + 20]), "KCV"
            keys.append(key)
        self.pik, self.mak = keys[0], keys[1]
        self.tdk = keys[2] if len(keys) == 3 else None
        self.batch = answer.text(60)[2:8]

    def card_fields(
        self,
        card: str,
        expiry: str,
        *,
        pin: str | None = None,
        keyed: bool = False,
        encrypt_track_data: bool = False,
    ) -> dict[int, str | bytes]:
        """22, 26, 35 or 2 + 14, 52 or 62, 53 for a card presented at this terminal."""
        fields: dict[int, str | bytes] = {}
        if keyed:
            fields[2], fields[14] = card, expiry
        else:
            track = f"{card}D{expiry}1010000012345"
            if encrypt_track_data:
                assert self.tdk is not None
                track = encrypt_track(self.suite, self.tdk, track)
            fields[35] = track
        fields[22] = ("01" if keyed else "02") + ("1" if pin else "2")
        suite_digit = "6" if self.suite == "3des" else "4"
        track_digit = "1" if encrypt_track_data else "0"
        fields[53] = ("2" if pin else "0") + suite_digit + track_digit + "0" * 13
        if pin:
            fields[26] = "06"
            fields[52 if self.suite == "3des" else 62] = pin_block(self.suite, self.pik, pin, card)
        return fields

    def financial(
        self,
        mti: str,
        processing: str,
        message_type: str,
        card_fields: dict[int, str | bytes],
        *,
        amount_fen: int | None = None,
        partial: bool = False,
        extra: dict[int, str | bytes] | None = None,
    ) -> bytes:
        fields: dict[int, str | bytes] = {
            3: processing,
            11: self.next_trace(),
            25: "00",
            49: "156",
            60: f"{message_type}{self.batch}000" + "20" + ("1" if partial else "0"),
            **self.ids(),
            **card_fields,
        }
        if amount_fen is not None:
            fields[4] = f"{amount_fen:012d}"
        fields.update(extra or {})
        return self.signed(mti, fields)

    def check(self, request: bytes, payload: bytes) -> Answer:
        """Parse an answer and check what §1, §4 and §5.1 promise of it."""
        mti, fields, tpdu, header = parse(payload)
        request_mti = request[11:13].hex()
        assert mti == f"{int(request_mti) + 10:04d}"
        assert tpdu == request[:1] + request[3:5] + request[1:3]
        _, request_fields, _, _ = parse(request)
        for number in (11, 41, 42):
            assert fields[number] == request_fields[number]
        answer = Answer(mti, fields, tpdu, header, payload)
        if fields[39] in ("00", "10") and 64 in fields:
            assert mac(self.suite, self.mak, payload[11:-8]) == fields[64], "answer MAC"
        return answer


class Link:
    """A blocking TCP link to the gateway: send a payload, read its answer."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.socket = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def send(self, payload: bytes) -> None:
        self.socket.sendall(len(payload).to_bytes(2, "big") + payload)

    def receive(self) -> bytes:
        while True:
            if len(self.buffer) >= 2:
                length = int.from_bytes(self.buffer[:2], "big")
                if len(self.buffer) >= 2 + length:
                    payload = self.buffer[2 : 2 + length]
                    self.buffer = self.buffer[2 + length :]
                    return payload
            chunk = self.socket.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the gateway")
            self.buffer += chunk

    def exchange(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.receive()

    def close(self) -> None:
        self.socket.close()

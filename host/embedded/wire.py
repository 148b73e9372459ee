"""MongoDB wire-protocol framing: OP_MSG, the legacy OP_QUERY handshake and OP_REPLY.

Follows the OP_MSG specification (``source/message/OP_MSG.md`` in the MongoDB
specifications repository) and the legacy opcodes drivers still use for their
first handshake. Anything that does not parse raises :class:`ProtocolError`; the
server answers that by closing the one connection it arrived on.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.errors import BSONError

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

HEADER = struct.Struct("<iiii")
MAX_MESSAGE_SIZE = 48_000_000
MAX_BSON_SIZE = 16 * 1024 * 1024

FLAG_CHECKSUM_PRESENT = 1 << 0
FLAG_MORE_TO_COME = 1 << 1
FLAG_EXHAUST_ALLOWED = 1 << 16
# The low 16 bits are "required" flags: an unknown one must be rejected.
_KNOWN_REQUIRED_FLAGS = FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME

CODEC_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(document_class=dict)


class ProtocolError(Exception):
    """A message that cannot be framed or decoded; the connection is closed."""


@dataclass(slots=True)
class Request:
    """One decoded client message.

    Attributes:
        request_id: The client's requestID, echoed as ``responseTo``.
        op_code: OP_MSG or OP_QUERY.
        body: The command document, with kind-1 sections merged in.
        db: The target database (``$db`` for OP_MSG, the namespace for OP_QUERY).
        more_to_come: The client expects no reply.
        exhaust_allowed: The client accepts exhaust replies (not used).
    """

    request_id: int
    op_code: int
    body: dict[str, Any]
    db: str
    more_to_come: bool = False
    exhaust_allowed: bool = False
    raw_size: int = field(default=0, repr=False)


def _crc32c_table() -> list[int]:
    poly = 0x82F63B78
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC-32C (Castagnoli) of ``data``, as OP_MSG checksums use."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _decode_document(data: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        return bson.decode(bytes(data), CODEC_OPTIONS)
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"malformed BSON in {what}: {exc}") from exc


def _read_cstring(data: bytes, offset: int) -> tuple[str, int]:
    end = data.find(b"\x00", offset)
    if end < 0:
        raise ProtocolError("unterminated cstring")
    try:
        return data[offset:end].decode("utf-8"), end + 1
    except UnicodeDecodeError as exc:
        raise ProtocolError("cstring is not UTF-8") from exc


def parse_op_msg(request_id: int, payload: bytes) -> Request:
    """Decode the part of an OP_MSG after the header.

    Args:
        request_id: The header's requestID.
        payload: Flag bits, sections and the optional checksum.

    Returns:
        The request, with document sequences merged into the body.

    Raises:
        ProtocolError: On unknown required flags, a bad checksum or bad sections.
    """
    if len(payload) < 5:
        raise ProtocolError("OP_MSG too short")
    (flags,) = struct.unpack_from("<I", payload, 0)
    unknown = flags & 0xFFFF & ~_KNOWN_REQUIRED_FLAGS
    if unknown:
        raise ProtocolError(f"OP_MSG has unknown required flag bits {unknown:#x}")
    end = len(payload)
    if flags & FLAG_CHECKSUM_PRESENT:
        if len(payload) < 9:
            raise ProtocolError("OP_MSG checksum flag set but no checksum")
        end -= 4
        (expected,) = struct.unpack_from("<I", payload, end)
        header = HEADER.pack(len(payload) + HEADER.size, request_id, 0, OP_MSG)
        if crc32c(header + payload[:end]) != expected:
            raise ProtocolError("OP_MSG checksum mismatch")
    offset = 4
    body: dict[str, Any] | None = None
    sequences: dict[str, list[dict[str, Any]]] = {}
    while offset < end:
        kind = payload[offset]
        offset += 1
        if kind == 0:
            if body is not None:
                raise ProtocolError("OP_MSG has more than one body section")
            size = _doc_size(payload, offset, end)
            body = _decode_document(payload[offset : offset + size], "OP_MSG body")
            offset += size
        elif kind == 1:
            if offset + 4 > end:
                raise ProtocolError("truncated document sequence")
            (size,) = struct.unpack_from("<i", payload, offset)
            seq_end = offset + size
            if size < 5 or seq_end > end:
                raise ProtocolError("document sequence size out of range")
            ident, pos = _read_cstring(payload, offset + 4)
            docs = sequences.setdefault(ident, [])
            while pos < seq_end:
                dsize = _doc_size(payload, pos, seq_end)
                docs.append(_decode_document(payload[pos : pos + dsize], f"sequence {ident!r}"))
                pos += dsize
            offset = seq_end
        else:
            raise ProtocolError(f"unknown OP_MSG section kind {kind}")
    if body is None:
        raise ProtocolError("OP_MSG has no body section")
    for ident, docs in sequences.items():
        if ident in body:
            raise ProtocolError(f"field {ident!r} is both in the body and a document sequence")
        body[ident] = docs
    db = body.get("$db")
    if not isinstance(db, str) or not db:
        raise ProtocolError("OP_MSG body has no $db")
    return Request(
        request_id=request_id,
        op_code=OP_MSG,
        body=body,
        db=db,
        more_to_come=bool(flags & FLAG_MORE_TO_COME),
        exhaust_allowed=bool(flags & FLAG_EXHAUST_ALLOWED),
        raw_size=len(payload) + HEADER.size,
    )


def _doc_size(data: bytes, offset: int, end: int) -> int:
    if offset + 4 > end:
        raise ProtocolError("truncated BSON document")
    (size,) = struct.unpack_from("<i", data, offset)
    if size < 5 or offset + size > end:
        raise ProtocolError("BSON document size out of range")
    return int(size)


def parse_op_query(request_id: int, payload: bytes) -> Request:
    """Decode a legacy OP_QUERY, as drivers send for their first handshake.

    Only commands (``<db>.$cmd``) are accepted; a ``$query`` wrapper is unwrapped.

    Raises:
        ProtocolError: On anything but a well-formed command query.
    """
    if len(payload) < 4:
        raise ProtocolError("OP_QUERY too short")
    namespace, offset = _read_cstring(payload, 4)
    offset += 8  # numberToSkip, numberToReturn
    size = _doc_size(payload, offset, len(payload))
    query = _decode_document(payload[offset : offset + size], "OP_QUERY")
    db, _, coll = namespace.partition(".")
    if coll != "$cmd" or not db:
        raise ProtocolError(f"OP_QUERY is only supported for commands, not {namespace!r}")
    if "$query" in query and isinstance(query["$query"], dict):
        body = dict(query["$query"])
        for key in ("$readPreference", "$clusterTime"):
            if key in query:
                body[key] = query[key]
    else:
        body = query
    return Request(request_id=request_id, op_code=OP_QUERY, body=body, db=db, raw_size=size)


async def read_request(reader: asyncio.StreamReader, max_size: int = MAX_MESSAGE_SIZE) -> Request:
    """Read and decode one message from ``reader``.

    Raises:
        asyncio.IncompleteReadError: On end of stream (clean or not).
        ProtocolError: On a message that is too large, of an unknown opcode, or malformed.
    """
    header = await reader.readexactly(HEADER.size)
    length, request_id, _response_to, op_code = HEADER.unpack(header)
    if length < HEADER.size + 1 or length > max_size:
        raise ProtocolError(f"message length {length} out of range")
    if op_code == OP_COMPRESSED:
        raise ProtocolError("OP_COMPRESSED received, but no compression was negotiated")
    if op_code not in (OP_MSG, OP_QUERY):
        raise ProtocolError(f"unsupported opcode {op_code}")
    payload = await reader.readexactly(length - HEADER.size)
    if op_code == OP_MSG:
        return parse_op_msg(request_id, payload)
    return parse_op_query(request_id, payload)


def encode_reply(
    request: Request, doc: dict[str, Any], request_id: int, *, more_to_come: bool = False
) -> bytes:
    """Encode ``doc`` as the reply to ``request`` (OP_MSG, or OP_REPLY for OP_QUERY).

    ``more_to_come`` sets the OP_MSG moreToCome flag: an exhaust reply, after which the
    server sends more replies without another request (only for ``exhaustAllowed``).
    """
    data = bson.encode(doc, codec_options=CODEC_OPTIONS)
    if request.op_code == OP_QUERY:
        # responseFlags, cursorID, startingFrom, numberReturned
        prefix = struct.pack("<iqii", 0, 0, 0, 1)
        total = HEADER.size + len(prefix) + len(data)
        return HEADER.pack(total, request_id, request.request_id, OP_REPLY) + prefix + data
    total = HEADER.size + 4 + 1 + len(data)
    return (
        HEADER.pack(total, request_id, request.request_id, OP_MSG)
        + struct.pack("<I", FLAG_MORE_TO_COME if more_to_come else 0)
        + b"\x00"
        + data
    )

"""Protobuf wire bytes written by hand, where building a message would cost more than the bytes.

A message's fields may come in any order and a map's entries are separate fields, so a
message can be assembled from pieces serialized once (the load generator's requests,
the server's v2 answers) and a field appended to the end of one already serialized.
"""

from __future__ import annotations


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: its tag, the payload's length (a varint), the payload."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload

"""Protobuf wire bytes written by hand, where building a message would cost more than the bytes.

A message's fields may come in any order and a map's entries are separate fields, so a
message can be assembled from pieces serialized once (the load generator's requests,
the server's v2 answers) and a field appended to the end of one already serialized.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

#: The length before each element of a raw BYTES tensor (Open Inference Protocol v2): 4 bytes, little-endian.
LENGTH_PREFIX = struct.Struct("<I")


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


def join_length_prefixed(elements: Sequence[bytes]) -> bytes:
    """A raw BYTES tensor of ``elements``: each one's length (4 bytes, little-endian), then its bytes."""
    return b"".join(LENGTH_PREFIX.pack(len(element)) + element for element in elements)


def split_length_prefixed(data: bytes, max_elements: int | None = None) -> list[bytes]:
    """The elements of a raw BYTES tensor (the inverse of :func:`join_length_prefixed`).

    Bytes that do not hold whole elements, or more than ``max_elements`` of them (refused as
    soon as it is seen, whatever the rest holds), raise ``ValueError`` saying what the tensor
    does wrong ("holds more than ...").
    """
    elements: list[bytes] = []
    position = 0
    while position < len(data):
        if len(elements) == max_elements:
            raise ValueError(f"holds more than {max_elements} elements; at most {max_elements} per request")
        if position + LENGTH_PREFIX.size > len(data):
            raise ValueError(f"ends inside an element's 4-byte length prefix (at byte {position})")
        (length,) = LENGTH_PREFIX.unpack_from(data, position)
        position += LENGTH_PREFIX.size
        if position + length > len(data):
            raise ValueError(
                f"has an element ({len(elements)}) declaring {length} bytes where only {len(data) - position} remain"
            )
        elements.append(data[position : position + length])
        position += length
    return elements

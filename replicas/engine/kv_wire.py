"""The versioned wire format of a prompt's KV cache, sent from a prefill worker to a decode worker.

Layout (all integers little-endian)::

    b"TSKV" | u16 format version | u32 header length | header (JSON) | body

The header says what the body holds and what it belongs to: model fingerprint, bootstrap room,
token count, layer/head/dim shape, compression, group size, the first output token (prefill samples
it) and a SHA-256 of the prompt ids, so a decode worker never continues from somebody else's KV.
The body is, for each layer, K then V, each ``[kv_heads, tokens, head_dim]``:

* ``none``: float32 values as computed (decode continues bit-exactly);
* ``int8``: per group of ``group_size`` values along head_dim (64 when it divides head_dim), one
  float16 scale (absmax/127), then the int8 codes;
* ``int4``: the same with absmax/7 and codes in [-7, 7], stored +8 as two nibbles per byte.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

MAGIC = b"TSKV"
WIRE_VERSION = 1
_PREFIX = struct.Struct("<4sHI")
COMPRESSIONS = ("none", "int8", "int4")
_QMAX = {"int8": 127, "int4": 7}


class WireError(ValueError):
    """A KV payload that is malformed, of an unknown version, or not for this request/model."""


@dataclass
class KVPayload:
    """A prompt's KV cache in float32, per layer ``(K, V)`` each ``[kv_heads, tokens, head_dim]``."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    first_token: int
    room: int
    model: str
    prompt_sha256: str
    first_logprob: float | None = None
    first_top: list[tuple[int, float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.layers[0][0].shape[1]) if self.layers else 0


def prompt_digest(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def group_size_for(head_dim: int) -> int:
    """Quantization group: 64 values when head_dim allows (what the planner's cost model assumes)."""
    for g in (64, 32, 16, 8, 4, 2, 1):
        if head_dim % g == 0:
            return g
    return 1


def encode(payload: KVPayload, compression: str = "none") -> bytes:
    if compression not in COMPRESSIONS:
        raise WireError(f"unknown compression {compression!r}; use one of {', '.join(COMPRESSIONS)}")
    k0 = payload.layers[0][0]
    heads, tokens, head_dim = (int(x) for x in k0.shape)
    group = group_size_for(head_dim)
    chunks: list[bytes] = []
    for k, v in payload.layers:
        for t in (k, v):
            chunks.extend(_encode_tensor(np.ascontiguousarray(t, dtype=np.float32), compression, group))
    body_len = sum(len(c) for c in chunks)
    header = orjson.dumps({
        "version": WIRE_VERSION, "room": payload.room, "model": payload.model, "num_tokens": tokens,
        "layers": len(payload.layers), "kv_heads": heads, "head_dim": head_dim, "compression": compression,
        "group_size": group, "first_token": payload.first_token, "first_logprob": payload.first_logprob,
        "first_top": payload.first_top, "prompt_sha256": payload.prompt_sha256, "body_bytes": body_len,
        "extra": payload.extra,
    })
    return b"".join([_PREFIX.pack(MAGIC, WIRE_VERSION, len(header)), header, *chunks])


def decode(data: bytes) -> tuple[KVPayload, dict[str, Any]]:
    """Parse a payload back to float32 arrays; returns the payload and its header."""
    if len(data) < _PREFIX.size:
        raise WireError("KV payload too short")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError("not a KV payload (bad magic)")
    if version != WIRE_VERSION:
        raise WireError(f"KV wire format version {version} is not supported (this worker speaks {WIRE_VERSION})")
    try:
        header = orjson.loads(data[_PREFIX.size : _PREFIX.size + hlen])
    except orjson.JSONDecodeError as e:
        raise WireError(f"KV payload header is not JSON: {e}") from e
    body = memoryview(data)[_PREFIX.size + hlen :]
    if len(body) != header["body_bytes"]:
        raise WireError(f"KV payload body has {len(body)} bytes, header says {header['body_bytes']}")
    shape = (header["kv_heads"], header["num_tokens"], header["head_dim"])
    pos = 0
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(header["layers"]):
        pair = []
        for _kv in range(2):
            arr, pos = _decode_tensor(body, pos, shape, header["compression"], header["group_size"])
            pair.append(arr)
        layers.append((pair[0], pair[1]))
    top = header.get("first_top")
    payload = KVPayload(
        layers=layers, first_token=header["first_token"], room=header["room"], model=header["model"],
        prompt_sha256=header["prompt_sha256"], first_logprob=header.get("first_logprob"),
        first_top=[(int(i), float(lp)) for i, lp in top] if top else None, extra=header.get("extra") or {},
    )
    return payload, header


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, compression: str) -> float:
    """Wire bytes per prompt token (body only) for a model shape: what the planner's cost model uses."""
    values = 2 * layers * kv_heads * head_dim
    if compression == "none":
        return values * 4.0
    group = group_size_for(head_dim)
    scales = values / group * 2
    return scales + (values if compression == "int8" else values / 2)


def _encode_tensor(x: np.ndarray, compression: str, group: int) -> list[bytes]:
    if compression == "none":
        return [x.tobytes()]
    qmax = _QMAX[compression]
    groups = x.reshape(-1, group)
    absmax = np.abs(groups).max(axis=1)
    scale = (absmax / qmax).astype(np.float16)
    scale[~(scale > 0)] = 1.0  # all-zero group (or underflow): any scale decodes to zero
    q = np.clip(np.rint(groups / scale.astype(np.float32)[:, None]), -qmax, qmax).astype(np.int8)
    if compression == "int8":
        return [scale.tobytes(), q.tobytes()]
    nib = (q.reshape(-1) + 8).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(8))
    packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    return [scale.tobytes(), packed.tobytes()]


def _decode_tensor(body: memoryview, pos: int, shape: tuple[int, int, int], compression: str,
                   group: int) -> tuple[np.ndarray, int]:
    n = shape[0] * shape[1] * shape[2]
    if compression == "none":
        end = pos + 4 * n
        return np.frombuffer(body[pos:end], dtype=np.float32).reshape(shape).copy(), end
    if compression not in _QMAX:
        raise WireError(f"unknown compression {compression!r} in KV payload")
    ngroups = n // group
    scale = np.frombuffer(body[pos : pos + 2 * ngroups], dtype=np.float16).astype(np.float32)
    pos += 2 * ngroups
    if compression == "int8":
        q = np.frombuffer(body[pos : pos + n], dtype=np.int8).astype(np.float32)
        pos += n
    else:
        nbytes = (n + 1) // 2
        packed = np.frombuffer(body[pos : pos + nbytes], dtype=np.uint8)
        pos += nbytes
        nib = np.empty(nbytes * 2, dtype=np.uint8)
        nib[0::2] = packed & 0x0F
        nib[1::2] = packed >> 4
        q = nib[:n].astype(np.float32) - 8.0
    x = (q.reshape(ngroups, group) * scale[:, None]).reshape(shape)
    return x, pos

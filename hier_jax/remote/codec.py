"""What crosses the wire besides payloads, without pickle: a value made of dicts (string or integer keys), lists,
tuples, numbers, strings, None, arrays and `Payload`s becomes a JSON skeleton and the arrays' raw
bytes (payloads in the wire format of `link.wire`); nothing a peer sends can run code here.

Other pytrees (flax's State, optax's named tuples: what a worker's state holds) go as their leaves and the
string of their structure, which must be one both sides know (`structures`, from the same templates
on both sides, since both build the same model): no structure is ever rebuilt from what a peer says.

A message: the skeleton's length (u32), the skeleton (UTF-8 JSON), then each blob's bytes in order.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np

from hier_jax.link import wire
from hier_jax.quantization import Payload

_LEN = struct.Struct("<I")
_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}


class CodecError(wire.WireError):
    """A message whose skeleton or blobs do not fit together."""


def structures(*templates: Any) -> dict[str, Any]:
    """{structure string: treedef} of every non-basic pytree node inside `templates`."""
    known: dict[str, Any] = {}

    def walk(v: Any) -> None:
        if type(v) in (dict, list, tuple):
            for x in v.values() if type(v) is dict else v:
                walk(x)
        elif not _basic(v):
            treedef = jax.tree.structure(v)
            known[str(treedef)] = treedef

    for template in templates:
        walk(template)
    return known


def digest(tree: Any) -> str:
    """A fingerprint of a pytree's arrays (dtypes, shapes and bytes, in leaf order): the same on both
    sides exactly when the values are, wherever they were computed or restored."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _basic(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, jax.Array, np.ndarray, np.generic, Payload))


def encode(value: Any, known: dict[str, Any] | None = None) -> bytes:
    blobs: list[bytes] = []
    known = known or {}

    def skeleton(v: Any) -> Any:
        if isinstance(v, Payload):
            blobs.append(wire.pack(0, 0, jax.device_get(v)))
            return {"~payload": len(blobs) - 1}
        if isinstance(v, (jax.Array, np.ndarray, np.generic)):
            a = np.ascontiguousarray(np.asarray(v))
            blobs.append(a.tobytes())
            return {"~array": len(blobs) - 1, "dtype": a.dtype.name, "shape": list(a.shape)}
        if type(v) is dict:  # a plain one: flax's State and optax's named tuples keep their type below
            if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in v):
                raise TypeError(f"only string and integer keys cross the wire, got {sorted(map(repr, v))[:3]}")
            return {"~dict": [[k, skeleton(x)] for k, x in v.items()]}
        if type(v) is tuple:
            return {"~tuple": [skeleton(x) for x in v]}
        if type(v) is list:
            return [skeleton(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        leaves, treedef = jax.tree.flatten(v)
        if str(treedef) not in known:
            raise TypeError(f"a {type(v).__name__} cannot cross the wire (a structure the other side does not know)")
        return {"~tree": str(treedef), "leaves": [skeleton(x) for x in leaves]}

    head = json.dumps({"value": skeleton(value), "sizes": [len(b) for b in blobs]}).encode()
    return _LEN.pack(len(head)) + head + b"".join(blobs)


def decode(message: bytes, *, payload_limit: int, known: dict[str, Any] | None = None) -> Any:
    try:
        (n,) = _LEN.unpack_from(message)
        head = json.loads(message[_LEN.size : _LEN.size + n])
        sizes = [int(s) for s in head["sizes"]]
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise CodecError(f"a message whose skeleton cannot be read ({error})") from None
    offsets = np.cumsum([_LEN.size + n, *sizes]).tolist()
    if offsets[-1] != len(message):
        raise CodecError(f"a message of {len(message)} bytes whose blobs add up to {offsets[-1]}")
    blobs = [message[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]

    def value(v: Any) -> Any:
        if isinstance(v, list):
            return [value(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "~payload" in v:
            return wire.unpack(blobs[v["~payload"]], limit=payload_limit)[2]
        if "~array" in v:
            dtype = _DTYPES.get(v["dtype"]) or np.dtype(v["dtype"])
            if dtype.kind not in "biuf" and dtype not in _DTYPES.values():
                raise ValueError(f"arrays of {dtype} do not cross the wire")
            return np.frombuffer(blobs[v["~array"]], dtype).reshape(v["shape"])
        if "~tree" in v:
            if v["~tree"] not in (known or {}):
                raise ValueError("a structure this side does not know")
            return jax.tree.unflatten((known or {})[v["~tree"]], [value(x) for x in v["leaves"]])
        if "~tuple" in v:
            return tuple(value(x) for x in v["~tuple"])
        return {k if isinstance(k, (str, int)) else str(k): value(x) for k, x in v["~dict"]}

    try:
        return value(head["value"])
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise CodecError(f"a message whose skeleton and blobs do not fit ({error})") from None

"""Plain data: builtin values as one line of JSON, with no object a program defined.

The HumanEval grader sends test arguments into the sandbox and return values out of it in
this form, so the trusted side only ever compares values it built itself from builtins.

`encode` accepts exactly (no subclasses): None, bool, int, float (nan and ±inf included),
complex, str, bytes, and list, tuple, dict, set, frozenset of those. A list is a JSON array;
every other non-JSON type is a one-key object: {"tuple": [...]}, {"set": [...]},
{"frozenset": [...]}, {"dict": [[key, value], ...]}, {"complex": [re, im]},
{"bytes": "<hex>"}, and {"int": "<hex>"} for integers beyond ±2**63 (linear-time parsing).
`decode` accepts exactly what `encode` produces and raises ValueError on anything else.

This module uses only the standard library and imports nothing from jaxsample: its source
runs as is inside the sandboxed worker and the grader's judge process.
"""

import json

_BIG_INT = 1 << 63


def encode(value) -> str:
    """One line of JSON for `value`; TypeError names the first value that is not plain data."""
    try:
        return json.dumps(_to_json(value), allow_nan=True, separators=(",", ":"))
    except RecursionError:
        raise TypeError("value nested too deeply (or self-referencing) for plain data") from None


def decode(text):
    """The value `encode` wrote as `text`; ValueError if `text` is not such an encoding."""
    try:
        return _from_json(json.loads(text))
    except RecursionError:
        raise ValueError("plain data nested too deeply") from None
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"not plain data: {e}") from None


def _to_json(value):
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        return value if -_BIG_INT < value < _BIG_INT else {"int": hex(value)}
    if kind is list:
        return [_to_json(item) for item in value]
    if kind is tuple or kind is set or kind is frozenset:
        return {kind.__name__: [_to_json(item) for item in value]}
    if kind is dict:
        return {"dict": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if kind is bytes:
        return {"bytes": value.hex()}
    raise TypeError(f"a value of type {kind.__module__}.{kind.__qualname__} is not plain data "
                    "(allowed: exact builtin scalars, str, bytes and their containers)")


def _from_json(node):
    kind = type(node)
    if node is None or kind is bool or kind is str or kind is float or kind is int:
        return node
    if kind is list:
        return [_from_json(item) for item in node]
    if kind is not dict or len(node) != 1:
        raise ValueError(f"not plain data: unexpected JSON {kind.__name__}")
    (tag, body), = node.items()
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"not plain data: {tag!r} needs a list")
    if tag == "tuple":
        return tuple(_from_json(item) for item in body)
    if tag == "set":
        return {_from_json(item) for item in body}
    if tag == "frozenset":
        return frozenset(_from_json(item) for item in body)
    if tag == "dict":
        if not all(type(pair) is list and len(pair) == 2 for pair in body):
            raise ValueError("not plain data: a dict needs [key, value] pairs")
        return {_from_json(k): _from_json(v) for k, v in body}
    if tag == "complex" and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(*body)
    raise ValueError(f"not plain data: unknown tag {tag!r}")

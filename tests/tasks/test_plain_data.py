"""Plain data: exact builtin values round-trip; anything a program defined is refused."""

import math

import pytest

from jaxsample.tasks.plain_data import decode, encode

VALUES = [
    None, True, False, 0, -7, 2**63, -(2**200), 1.5, -0.0, float("inf"), float("-inf"),
    "", "naïve\n\"quoted\"", b"\x00\xff", 2 + 3j, [], [1, [2.5, "x"]], (), (1, (2, 3)),
    {1, "a", (2, 3)}, frozenset({1, 2}), {}, {1: "a", (1, 2): [None], "k": {"n": 1.0}},
    [True, 1, 1.0],
]


# Ids by type, not repr: a set's repr depends on the hash seed, which differs between
# pytest-xdist workers, and the workers must collect the same test ids.
@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_builtin_values_round_trip_with_their_exact_types(value):
    decoded = decode(encode(value))
    assert decoded == value and repr(decoded) == repr(value)
    assert "\n" not in encode(value)


def test_nan_round_trips():
    assert math.isnan(decode(encode(float("nan"))))
    assert math.isnan(decode(encode([float("nan")]))[0])


class AlwaysEqual:
    def __eq__(self, other):
        return True


class Int(int):
    def __eq__(self, other):
        return True


@pytest.mark.parametrize("value", [
    AlwaysEqual(), Int(3), [1, Int(2)], {"k": AlwaysEqual()}, (x for x in [1]), range(3),
    type("Str", (str,), {})("s"), {1: object()}, len,
], ids=lambda v: type(v).__name__)
def test_objects_a_program_defined_are_refused(value):
    with pytest.raises(TypeError, match="not plain data"):
        encode(value)


def test_self_referencing_values_are_refused():
    loop = []
    loop.append(loop)
    with pytest.raises(TypeError, match="nested too deeply"):
        encode(loop)


@pytest.mark.parametrize("text", [
    "", "{", '{"a": 1}', '{"tuple": 1}', '{"set": [[1]]}', '{"dict": [[1]]}',
    '{"int": "zz"}', '{"bytes": "0"}', '{"complex": ["a", 1]}', '{"tuple": [], "set": []}',
    "[" * 100_000 + "]" * 100_000,
])
def test_malformed_or_forged_text_raises_value_error(text):
    with pytest.raises(ValueError):
        decode(text)

"""The channel between the tests and the solution carries plain data only, both ways, and a
hostile peer's bytes decode to plain data or to an error, never to anything else."""

import math
import random

import pytest

from reward.plain_data import MAX_DEPTH, NotPlainData, decode, encode

PLAIN = {type(None), bool, int, float, str, bytes, list, tuple, dict, set, frozenset}


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["none", "bool", "int", "bigint", "float", "str", "bytes"] + (
        ["list", "tuple", "dict", "set", "frozenset"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-10 ** 19 + 1, 10 ** 19 - 1)
    if kind == "bigint":
        return rng.choice([-1, 1]) * rng.randint(10 ** 19, 10 ** 60)
    if kind == "float":
        return rng.choice([rng.uniform(-1e300, 1e300), rng.random(), -0.0, math.inf, -math.inf, 5e-324])
    if kind == "str":
        return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0xD7FF), 0xD800, 0x1F600]))
                       for _ in range(rng.randint(0, 8)))
    if kind == "bytes":
        return bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 8)))
    hashable = lambda: rng.choice([rng.randint(-5, 5), str(rng.random()), (rng.randint(0, 3), "x"), None])  # noqa: E731
    n = rng.randint(0, 4)
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(n)]
    if kind == "tuple":
        return tuple(_random_value(rng, depth + 1) for _ in range(n))
    if kind == "dict":
        return {hashable(): _random_value(rng, depth + 1) for _ in range(n)}
    return (set if kind == "set" else frozenset)(hashable() for _ in range(n))


def _same(a, b) -> bool:
    """Equal with the same exact types all the way down (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _all_plain(v, depth=0) -> bool:
    if type(v) not in PLAIN or depth > MAX_DEPTH + 1:
        return False
    if isinstance(v, (list, tuple, set, frozenset)):
        return all(_all_plain(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(_all_plain(k, depth + 1) and _all_plain(x, depth + 1) for k, x in v.items())
    return True


def test_round_trip_keeps_values_and_exact_types():
    rng = random.Random(0)
    for _ in range(2000):
        v = _random_value(rng)
        assert _same(decode(encode(v)), v), v
    for v in [float("nan"), -0.0, 10 ** 19 - 1, 10 ** 19, -(10 ** 19), 2 ** 4000, "\ud800", b"", (), frozenset()]:
        assert _same(decode(encode(v)), v)


class _Liar(int):
    def __eq__(self, other):
        return True


class _Always:
    __eq__ = staticmethod(lambda *a: True)


@pytest.mark.parametrize("value", [_Liar(1), _Always(), [1, _Always()], {"k": (_Liar(2),)}, lambda: 1, print,
                                   (x for x in ()), 1j, bytearray(b"x"), range(3), Exception("x"), type])
def test_anything_else_is_refused(value):
    with pytest.raises(NotPlainData):
        encode(value)


def test_cycles_and_sizes_are_refused():
    loop = []
    loop.append(loop)
    with pytest.raises(NotPlainData, match="deeper"):
        encode(loop)
    with pytest.raises(NotPlainData, match="more than"):
        encode(list(range(100)), max_items=50)


def test_hostile_bytes_decode_to_plain_data_or_fail():
    """Random mutations of valid messages (and plain noise): whatever decodes is plain."""
    rng = random.Random(1)
    decoded = failed = 0
    for _ in range(3000):
        data = bytearray(encode(_random_value(rng)))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randint(0, len(data))
            if op < 0.4 and data:
                data[min(pos, len(data) - 1)] = rng.randint(0, 255)
            elif op < 0.7:
                data[pos:pos] = bytes(rng.choice(b"NTFiIfsbltSzd0123456789:;-x") for _ in range(rng.randint(1, 3)))
            else:
                del data[pos:pos + rng.randint(1, 3)]
        try:
            value = decode(bytes(data))
        except NotPlainData:
            failed += 1
            continue
        decoded += 1
        assert _all_plain(value), value
    assert decoded > 100 and failed > 100  # both branches exercised


@pytest.mark.parametrize("data", [b"", b"q", b"i1_0;", b"i 1;", b"i+1;", b"i1;N", b"I0x1;", b"I0x;", b"f0x1p99999;",
                                  b"s3:ab", b"s1:\xff", b"l2:N", b"S1:l0:", b"d1:l0:N", b"l9999999999999:",
                                  b"l1:" * 100 + b"N", "s1:a".encode(), b"i" + b"9" * 40 + b";"])
def test_malformed_messages_fail(data):
    if data == b"s1:a":
        assert decode(data) == "a"  # the control: a well-formed message decodes
        return
    with pytest.raises(NotPlainData):
        decode(data)

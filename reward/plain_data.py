"""Plain data across a process boundary: None, bool, int, float, str, bytes, and lists,
tuples, dicts, sets and frozensets of them.

The code reward's tests call the solution through this channel, so what comes back from the
solution can only be a value of these exact built-in types: an object with its own `__eq__`,
a subclass, a generator or a callable is not plain data and cannot cross. Decoding builds
fresh built-in values and checks every tag, length, size and depth, so a hostile peer can
make it fail (which fails the test) but cannot make it produce anything else.

The format is a small tagged byte string, written and read in pure Python, so the sandboxed
processes import nothing to speak it (importing json alone costs a process 6 ms):
    N T F                        None, True, False
    i<decimal>;  I<hex>;         ints (beyond 19 digits in hex, which converts in linear time)
    f<float.hex()>;              floats, exactly (inf, nan and -0.0 included)
    s<n>:<n bytes of UTF-8>      str (lone surrogates kept)
    b<n>:<n bytes>               bytes
    l<n>:  t<n>:  S<n>:  z<n>:   list, tuple, set, frozenset of the n values that follow
    d<n>:                        dict of the n key, value pairs that follow
A message on a pipe is its length in decimal, a newline, then the encoded value.

This file is also copied into the sandbox and imported there (standard library only).
"""

MAX_DEPTH = 64
MAX_ITEMS = 1_000_000
MAX_MESSAGE = 16 << 20
_SMALL = 10 ** 19
_CONTAINERS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}
_HEX = frozenset(b"0123456789abcdef")


class NotPlainData(TypeError):
    pass


def encode(value, max_items: int = MAX_ITEMS) -> bytes:
    """NotPlainData for anything outside the plain types (exact types, no subclasses), for
    cycles (as depth) and for values of more than `max_items` nodes."""
    out: list[bytes] = []
    budget = [max_items]

    def enc(v, depth):
        budget[0] -= 1
        if budget[0] < 0:
            raise NotPlainData(f"more than {max_items} values")
        if depth > MAX_DEPTH:
            raise NotPlainData(f"nested deeper than {MAX_DEPTH}")
        t = type(v)
        if v is None:
            out.append(b"N")
        elif t is bool:
            out.append(b"T" if v else b"F")
        elif t is int:
            out.append(b"i%d;" % v if -_SMALL < v < _SMALL else b"I" + hex(v).encode() + b";")
        elif t is float:
            out.append(b"f" + v.hex().encode() + b";")
        elif t is str:
            data = v.encode("utf-8", "surrogatepass")
            out.append(b"s%d:" % len(data) + data)
        elif t is bytes:
            out.append(b"b%d:" % len(v) + v)
        elif t in _CONTAINERS:
            out.append(_CONTAINERS[t] + b"%d:" % len(v))
            for x in v:
                enc(x, depth + 1)
        elif t is dict:
            out.append(b"d%d:" % len(v))
            for k, x in v.items():
                enc(k, depth + 1)
                enc(x, depth + 1)
        else:
            raise NotPlainData(f"a {t.__module__}.{t.__qualname__} is not plain data")

    enc(value, 0)
    return b"".join(out)


def decode(data: bytes, max_items: int = MAX_ITEMS):
    """The value `encode` wrote; NotPlainData for anything else, including trailing bytes."""
    if type(data) is not bytes:
        raise NotPlainData("plain data is decoded from bytes")
    budget = [max_items]
    end = len(data)

    def number(i: int, stop: bytes) -> tuple[bytes, int]:
        j = data.find(stop, i, i + 32 if stop == b":" else end)
        if j < 0:
            raise NotPlainData("truncated or overlong number")
        return data[i:j], j + 1

    def count(i: int) -> tuple[int, int]:
        text, i = number(i, b":")
        if not text.isdigit() or len(text) > 12:
            raise NotPlainData("bad length")
        return int(text), i

    def dec(i: int, depth: int):
        budget[0] -= 1
        if budget[0] < 0:
            raise NotPlainData(f"more than {max_items} values")
        if depth > MAX_DEPTH:
            raise NotPlainData(f"nested deeper than {MAX_DEPTH}")
        if i >= end:
            raise NotPlainData("truncated")
        tag = data[i:i + 1]
        i += 1
        if tag == b"N":
            return None, i
        if tag == b"T":
            return True, i
        if tag == b"F":
            return False, i
        if tag == b"i":
            text, i = number(i, b";")
            digits = text[1:] if text[:1] == b"-" else text
            if not digits.isdigit() or len(digits) > 19:
                raise NotPlainData("bad int")
            return int(text), i
        if tag == b"I":
            text, i = number(i, b";")
            sign, body = (-1, text[3:]) if text[:3] == b"-0x" else (1, text[2:]) if text[:2] == b"0x" else (0, b"")
            if not sign or not body or not set(body) <= _HEX:
                raise NotPlainData("bad hex int")
            n = sign * int(body, 16)
            if -_SMALL < n < _SMALL:
                raise NotPlainData("a small int must be decimal")
            return n, i
        if tag == b"f":
            text, i = number(i, b";")
            try:
                return float.fromhex(text.decode("ascii")), i
            except (ValueError, UnicodeDecodeError, OverflowError):
                raise NotPlainData("bad float") from None
        if tag in (b"s", b"b"):
            n, i = count(i)
            if i + n > end:
                raise NotPlainData("truncated")
            raw = data[i:i + n]
            if tag == b"b":
                return raw, i + n
            try:
                return raw.decode("utf-8", "surrogatepass"), i + n
            except UnicodeDecodeError:
                raise NotPlainData("bad UTF-8") from None
        if tag in (b"l", b"t", b"S", b"z", b"d"):
            n, i = count(i)
            if n > budget[0]:
                raise NotPlainData(f"more than {max_items} values")
            items = []
            for _ in range(2 * n if tag == b"d" else n):
                x, i = dec(i, depth + 1)
                items.append(x)
            try:
                if tag == b"l":
                    return items, i
                if tag == b"t":
                    return tuple(items), i
                if tag == b"S":
                    return set(items), i
                if tag == b"z":
                    return frozenset(items), i
                return dict(zip(items[::2], items[1::2])), i
            except TypeError as e:  # a list as a set item or dict key
                raise NotPlainData(f"unhashable: {e}") from None
        raise NotPlainData(f"unknown tag {tag!r}")

    try:
        value, i = dec(0, 0)
    except RecursionError:
        raise NotPlainData("nested too deep") from None
    if i != end:
        raise NotPlainData("trailing bytes")
    return value


def write_message(fd: int, value) -> None:
    import os

    data = encode(value)
    view = memoryview(b"%d\n" % len(data) + data)
    while view:
        view = view[os.write(fd, view):]


def read_message(stream, limit: int = MAX_MESSAGE):
    """The next message from a binary stream; EOFError at the end, NotPlainData for a bad one."""
    head = stream.readline(24)
    if not head:
        raise EOFError("the peer closed the channel")
    if not head.endswith(b"\n") or not head[:-1].isdigit():
        raise NotPlainData("bad message header")
    n = int(head)
    if n > limit:
        raise NotPlainData(f"a message of {n} bytes exceeds {limit}")
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("the peer closed the channel mid-message")
    return decode(data)


def messages(data: bytes, limit: int = MAX_MESSAGE):
    """The messages in `data`, in order; stops at the first incomplete or malformed one (a
    writer killed mid-message)."""
    i = 0
    while i < len(data):
        j = data.find(b"\n", i, i + 24)
        if j < 0 or not data[i:j].isdigit():
            return
        n = int(data[i:j])
        if n > limit or j + 1 + n > len(data):
            return
        try:
            yield decode(data[j + 1:j + 1 + n])
        except NotPlainData:
            return
        i = j + 1 + n

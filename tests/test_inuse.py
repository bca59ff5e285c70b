"""``inuse.ThreadView.touches``: the fast scan of a stopped thread's stack agrees with a word-by-word check.

The scan only decodes the 8-byte words whose upper half is the range's (found with ``bytes.find``); these
cases put that upper half everywhere it could mislead: at unaligned offsets, in the trailing partial word, on
the range's exact bounds, and in ranges that cross a 4 GiB boundary (the word-by-word path).
"""

from __future__ import annotations

import random
import struct

from hotpatch.inuse import ThreadView, stack_words


def brute(view: ThreadView, lo: int, hi: int) -> bool:
    """Every pc and every aligned stack word, one by one."""
    return any(lo < v < hi for v in (*view.pcs, *stack_words(view.stack, view.word)))


def test_touches_agrees_with_a_word_by_word_check() -> None:
    rng = random.Random(3)
    base = 0x7F33_D282_0000
    for _ in range(3000):
        word = rng.choice((8, 8, 4))
        lo = base + rng.randrange(0, 1 << 16) if word == 8 else rng.randrange(0x1000, 0xFFFF_0000)
        hi = lo + rng.randrange(0, 64)
        if word == 8 and rng.random() < 0.1:  # a range across a 4 GiB boundary
            lo, hi = 0x5615_FFFF_FFF0, 0x5616_0000_0010
        values = []
        for _ in range(rng.randrange(0, 40)):
            pick = rng.random()
            if pick < 0.3:
                values.append(lo + rng.randrange(-2, hi - lo + 3))  # on and around the bounds
            elif pick < 0.6:
                values.append((lo & ~0xFFFF_FFFF) | rng.randrange(0, 1 << 32))  # same upper half
            else:
                values.append(rng.randrange(0, 1 << (8 * word)))
        fmt = "<Q" if word == 8 else "<I"
        data = b"".join(struct.pack(fmt, v & ((1 << (8 * word)) - 1)) for v in values)
        if rng.random() < 0.3:  # the upper half at an unaligned offset, and a trailing partial word
            data = data + struct.pack("<I", lo >> 32)[: rng.randrange(1, 5)]
        if rng.random() < 0.3 and len(data) > 8:
            cut = rng.randrange(1, len(data) - 4)
            data = data[:cut] + struct.pack("<I", (lo + 1) >> 32) + data[cut + 4 :]
        pcs = tuple(lo + rng.randrange(-1, 3) for _ in range(rng.randrange(1, 3)))
        view = ThreadView(pcs, data, word)
        assert view.touches(lo, hi) == brute(view, lo, hi), (hex(lo), hex(hi), word, data.hex(), pcs)


def test_touches_finds_a_return_address_deep_in_a_large_stack() -> None:
    lo, hi = 0x5615_DCC0_C000, 0x5615_DCC0_C005
    stack = bytearray(struct.pack("<Q", 0x7FFC_0000_1234) * 4096)
    struct.pack_into("<Q", stack, 8 * 4000, lo + 3)
    assert ThreadView((0x1000,), bytes(stack), 8).touches(lo, hi)
    struct.pack_into("<Q", stack, 8 * 4000, hi)  # the end is excluded
    assert not ThreadView((0x1000,), bytes(stack), 8).touches(lo, hi)

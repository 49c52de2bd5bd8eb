"""Contact memory past its bound: the cost of confirming contacts once the least recently
used ones are being forgotten (each confirm of a new contact then evicts one).

    .venv/bin/python benchmarks/bench_memory_eviction.py [--contacts 200000] [--confirms 600000]

Prints the seconds per 100,000 confirms as the memory fills and then evicts. A plain
dict evicted one key at a time from its front walks over the deleted entries' slots to
find its first key, which made each eviction cost more than the last (93.6 s for
600,000 confirms past a 200,000 bound on 2026-12-07, 2.4 s with evictions a hundredth at
a time)."""

from __future__ import annotations

import argparse
import time

from destination.pipeline.memory import ContactMemory, Note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=200_000, help="CONTACT_MEMORY_MAX")
    parser.add_argument("--confirms", type=int, default=600_000)
    args = parser.parse_args()
    memory = ContactMemory(1e9, args.contacts, max_bytes=1 << 40)
    body = b"\0" * 32  # two fields
    start = last = time.perf_counter()
    for i in range(1, args.confirms + 1):
        memory.confirm(Note((2 * i, 2 * i + 1), None, None, body))  # a user id and an e-mail
        if i % 100_000 == 0:
            now = time.perf_counter()
            print(f"  {i:>9,} confirms: {now - last:5.2f} s for the last 100,000", flush=True)
            last = now
    total = time.perf_counter() - start
    print(
        f"{args.confirms:,} confirms past a {args.contacts:,} bound: {total:.1f} s; "
        f"{len(memory):,} contacts remembered"
    )


if __name__ == "__main__":
    main()

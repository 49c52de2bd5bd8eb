"""Ask the shared store, from a process of its own, which messageIds it knows as
delivered, through the project's own look-up (what a replica or a restarted pod does
before sending a message again).

The model test runs its workers in one process, where every worker hashes alike; a
look-up that only works inside the process that recorded the ids (a per-process salted
hash) is found only from another process. The test runs this module with a
``PYTHONHASHSEED`` of its own::

    python -m tests.support.dedup_probe REDIS_URL PREFIX WINDOW < ids.json

reads a JSON list of messageIds on stdin and prints the JSON list of those the store
knows. ``PREFIX`` is the workers' ``{REDIS_KEY_PREFIX}:{workspace id}``.

This is the one place the model test names the de-duplication's look-up: when the
shared store's record of delivered ids changes shape, change ``known`` (not the test).
"""

from __future__ import annotations

import asyncio
import json
import sys


async def known(url: str, prefix: str, window: float, ids: list[str]) -> list[str]:
    from destination.gist._redis import redis_client
    from destination.pipeline.dedup import SharedIds

    client = redis_client(url, None, 5.0)
    try:
        await client.ping()  # unreachable must not read as "knows none of them"
        found = await SharedIds(client, prefix, window, 5.0).delivered(ids)
    finally:
        await client.aclose()
    return sorted(found)


def main() -> None:
    url, prefix, window = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ids = json.load(sys.stdin)
    print(json.dumps(asyncio.run(known(url, prefix, window, ids))))


if __name__ == "__main__":
    main()

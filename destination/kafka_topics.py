"""Whether a Kafka topic exists, asked without ever creating it.

A metadata request that names a topic creates it on a broker with
``auto.create.topics.enable`` (Kafka's default; Tansu always does): aiokafka's
``partitions_for``, a consumer's ``assign`` or ``subscribe``, the admin client's
``describe_topics`` all name it. A request for *all* topics never creates one
(KAFKA-5291), so that is the one asked here, and a topic is looked up in its answer.
Kafka leaves out of that answer the topics this client is not authorised to
``Describe``: a missing topic and a forbidden one look alike, and the errors say so.

Every command that takes a topic name checks it here before it reads or writes
anything: ``run`` (``KAFKA_DLQ_TOPIC``), ``replay`` (``--from``, ``--to``), ``plan``
(``--topic``) and ``produce`` (``--topic``, unless ``--create-topic``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Cluster(Protocol):
    """The part of aiokafka's ``ClusterMetadata`` used here."""

    def topics(self, exclude_internal_topics: bool = True) -> set[str]: ...

    def partitions_for_topic(self, topic: str) -> set[int] | None: ...


class MetadataClient(Protocol):
    """aiokafka's ``AIOKafkaClient`` (a producer's ``client``), or the in-memory twin's."""

    async def fetch_all_metadata(self) -> Cluster: ...


class MissingTopicError(Exception):
    """Topics an operator named are not in Kafka; ``missing`` maps each to the setting or
    option that named it. The message says what to do."""

    def __init__(self, missing: Mapping[str, str]) -> None:
        self.missing = dict(missing)
        named = "; ".join(f"{where}: no topic {topic!r}" for topic, where in missing.items())
        super().__init__(
            f"{named} (it does not exist, or this client is not authorised to Describe it; "
            "nothing was created): create it (kafka-topics.sh --create --topic ...), fix "
            "the name, or grant the ACLs the README lists under Prerequisites"
        )


async def topic_partitions(client: MetadataClient, names: Mapping[str, str]) -> dict[str, int]:
    """Each topic of ``names`` (topic -> the setting or option that named it) with its
    partition count, from one all-topics metadata request; ``MissingTopicError`` naming
    every one that is not there. Kafka's errors (no broker answers) pass through."""
    cluster = await client.fetch_all_metadata()
    known = cluster.topics(exclude_internal_topics=False)
    counts: dict[str, int] = {}
    missing: dict[str, str] = {}
    for topic, where in names.items():
        partitions = cluster.partitions_for_topic(topic) if topic in known else None
        if partitions:
            counts[topic] = len(partitions)
        else:
            missing[topic] = where
    if missing:
        raise MissingTopicError(missing)
    return counts


async def check_topics(
    bootstrap: str, security: Mapping[str, Any], names: Mapping[str, str], client_id: str
) -> dict[str, int]:
    """``topic_partitions`` over a client of its own, for the operator commands."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id=client_id, **security)
    try:
        await client.bootstrap()
        return await topic_partitions(client, names)
    finally:
        await client.close()

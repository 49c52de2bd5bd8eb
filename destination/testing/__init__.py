"""Test helpers, never used by the worker in production.

``destination.testing.local_kafka`` is an in-memory twin of a Kafka broker and of the
parts of aiokafka's consumer and producer the worker uses; ``tests/contract`` runs one
suite against it and against a real Kafka-protocol broker to keep the two alike.
"""

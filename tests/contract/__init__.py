"""One contract suite for the Kafka twin (``destination.testing.local_kafka``) and a real
Kafka-protocol broker: what the worker relies on must hold on both."""

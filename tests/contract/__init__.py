"""One contract suite for the Kafka twin (``destination.devtools.local_kafka``) and a real
Kafka-protocol broker: what the worker relies on must hold on both."""

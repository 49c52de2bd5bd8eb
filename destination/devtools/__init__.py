"""Local tools, never used by the worker in production: ``demo`` (the whole pipeline on
this machine), ``produce`` (a file of messages, or the ``sample`` stream, to a topic),
``broker`` (the embedded Tansu broker), ``sandbox`` (a stand-in for the Gist API) and
``local_kafka`` (an in-memory twin of Kafka and of the parts of aiokafka the worker uses;
``tests/contract`` runs one suite against it and a real broker to keep the two alike)."""

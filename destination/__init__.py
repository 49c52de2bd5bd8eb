"""gist-destination: forwards Segment-spec messages from Kafka to Gist.

Data flow, one package a step: ``pipeline`` consumes and decodes Kafka records,
``mapping`` turns each message into Gist ``operations``, ``pipeline`` batches and
orders them, ``gist`` sends them inside the workspace's rate limit, and ``pipeline``
commits offsets only for what Gist accepted or the dead-letter topic holds.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gist-destination")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

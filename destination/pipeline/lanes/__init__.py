"""The ways operations leave for Gist, one lane each, under one contract (``base``):
``requests`` (one request per operation), ``tags`` (many contacts per ``POST /tags``),
``imports`` (contacts batched into asynchronous imports) and ``polls`` (those imports
polled until they end)."""

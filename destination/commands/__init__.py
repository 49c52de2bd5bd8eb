"""The operator's commands (``gist-destination map``, ``replay``, ``plan``): each a module
with ``add_arguments(parser)`` and ``run(args) -> exit code``."""

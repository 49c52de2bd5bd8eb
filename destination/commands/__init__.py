"""The operator's commands (``gist-destination run``, ``check-config``, ``map``,
``replay``, ``plan``): each a module with ``add_arguments(parser)`` and
``run(args) -> exit code``. The local tools (``demo``, ``produce``, ``sandbox``) live in
``destination.devtools``."""

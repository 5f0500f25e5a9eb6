"""One module per `gen1` subcommand; each defines `register(subparsers)` and sets `func` on its parser."""

"""The command line: one module per `pear` subcommand, each with `add_cli(subparsers)`.

The library (`pear.evaluate`, `pear.fit`, ...) never imports these modules: they only turn
options into library calls and print what comes back.
"""

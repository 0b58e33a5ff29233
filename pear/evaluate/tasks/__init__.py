"""Built-in tasks; `register_all()` imports the modules, which register themselves."""

import importlib

BUILTIN = ("mdqa", "kv", "hotpotqa", "closedbook", "mmlu", "passkey", "copy")


def register_all() -> None:
    for name in BUILTIN:
        importlib.import_module(f"{__name__}.{name}")

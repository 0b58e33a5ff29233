"""Benchmarks that ship with pear: `pear bench overhead` (`inference.overhead`), what each way of helping a
model read its context costs at inference, with its peak-memory probe (`memory`)."""

from .inference import (
    METRICS,
    VARIANTS,
    check_same_architecture,
    format_table,
    overhead,
    write_json_atomic,
)

__all__ = ["METRICS", "VARIANTS", "check_same_architecture", "format_table", "overhead", "write_json_atomic"]

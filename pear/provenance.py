"""Where a result came from: software versions and the hardware it ran on.

One function for every command that saves figures (`pear run`'s pear.json, `pear eval`'s
results, `pear bench`), so that two results files always say the same things the same way
and a number can be traced to the machine and library versions that produced it.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch


def package_version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """pear, torch, transformers, accelerate and Python versions, and the OS in short."""
    from . import __version__

    return {"pear": __version__, "torch": torch.__version__, "transformers": package_version("transformers"),
            "accelerate": package_version("accelerate"), "python": platform.python_version(),
            "platform": platform.platform(terse=True)}


def device_name(device) -> str:
    """'cuda:0 (NVIDIA H200)' or 'cpu (16 threads)': the device and what it is."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev} ({torch.get_num_threads()} threads)"


def hardware(device=None) -> dict:
    """The machine: OS, CPU count, torch threads; the GPU's name when `device` is one; the
    number of processes when the work is spread over several (torchrun / accelerate launch)."""
    from .distributed import world_size

    hw = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device is not None:
        hw["device"] = device_name(device)
        if torch.device(device).type == "cuda":
            hw["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if world_size() > 1:
        hw["processes"] = world_size()
    return hw


def provenance(device=None) -> dict:
    """{"versions": ..., "hardware": ...}: the part of a results file that says where it came from."""
    return {"versions": versions(), "hardware": hardware(device)}

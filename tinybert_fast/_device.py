"""The one device resolution of the package (the loop, evaluation, the teacher-cache command and
augmentation all take a `--device` / `device=` argument)."""

from __future__ import annotations

import os

import torch


def resolve_device(device: "str | torch.device | None" = "auto") -> torch.device:
    """torch.device of a `device` argument.

    "auto" (or None): this rank's CUDA device when CUDA is available (cuda:LOCAL_RANK, so that each
    torchrun process takes its own GPU; cuda:0 without torchrun), else the CPU.  Anything else is
    passed to torch.device ("cpu", "cuda", "cuda:1", a torch.device); a CUDA device without CUDA
    raises ValueError naming the argument.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device (auto, cpu, cuda, cuda:N): "
                         f"{exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    return resolved

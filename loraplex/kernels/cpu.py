"""Builds and calls cpu.cpp, the mixed-adapter LoRA op on CPU (float32, bfloat16).

The source is compiled once per machine with the system's C++ compiler (about a second) into
`$LORAPLEX_KERNEL_CACHE`, default `<loraplex home>/cache/kernels`, keyed by the source, the
compiler and the CPU's instruction sets (it is built for this CPU: a home shared by machines of
several kinds gets one library per kind).
Without a compiler, or with LORAPLEX_CPU_KERNEL=0, add_lora keeps its plain PyTorch path, which
gives the same results, slower; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.home import loraplex_home

SOURCE = Path(__file__).with_name("cpu.cpp")
KERNEL_ENV = "LORAPLEX_CPU_KERNEL"  # "0": never build or use the kernel
CACHE_ENV = "LORAPLEX_KERNEL_CACHE"
CACHE_DIR = "cache/kernels"  # under the loraplex home, without CACHE_ENV
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
_ENTRY_NAMES = {torch.float32: "add_lora_f32", torch.bfloat16: "add_lora_bf16"}
_ENTRY_POINTS: dict[torch.dtype, Callable[..., int]] = {}  # filled by _library()

logger = logging.getLogger(__name__)


class KernelError(RuntimeError):
    """The kernel was handed tensors it cannot take (a bug in the caller, never user input)."""


def is_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether add_lora can use the kernel for tensors of this dtype on this device."""
    return device.type == "cpu" and dtype in _ENTRY_NAMES and _library() is not None


def add_lora_segments(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: tuple[torch.Tensor, ...],
    segments: torch.Tensor,
) -> None:
    """y[t] += the LoRA delta of slot s for every token t in [start, end) of each (s, start,
    end) in segments, in place (lora/ops.py add_lora's Semantics).

    Shapes: x [num_tokens, in], y [num_tokens, sum out_i], lora_a [max_loras, n * r, in],
    lora_b n x [max_loras, r, out_i], segments [m, 3] int64.
    """
    if _library() is None:
        raise KernelError("add_lora_segments: the CPU kernel is not available")
    num_slots, nr, in_features = lora_a.shape
    dtype, num_modules = x.dtype, len(lora_b)
    rank = nr // num_modules
    matrices, outs = [0, 0, 0], [0, 0, 0]  # up to 3 modules (FUSED_LINEARS)
    ok = (num_modules <= 3 and lora_a.dtype == dtype and y.dtype == dtype
          and x.stride(-1) == 1 and y.stride(-1) == 1 and x.shape[-1] == in_features
          and y.shape[0] == x.shape[0] and lora_a.is_contiguous()
          and segments.dtype == torch.int64 and segments.is_contiguous()
          and segments.dim() == 2 and segments.shape[1] == 3)
    for i, b in enumerate(lora_b if ok else ()):
        ok = (b.dtype == dtype and b.is_contiguous() and b.shape[0] == num_slots
              and b.shape[1] == rank)
        if not ok:
            break
        matrices[i], outs[i] = b.data_ptr(), b.shape[2]
    if not ok or y.shape[-1] != sum(outs):
        raise KernelError("add_lora_segments: tensors of unexpected dtype, shape or layout")
    status = _ENTRY_POINTS[dtype](
        segments.shape[0], segments.data_ptr(), x.shape[0], num_slots, x.data_ptr(), x.stride(0),
        in_features, lora_a.data_ptr(), rank, num_modules, *matrices, *outs, y.data_ptr(),
        y.stride(0), torch.get_num_threads(),
    )
    if status != 0:
        raise KernelError("add_lora_segments: a segment's slot or tokens are out of range")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(KERNEL_ENV) == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        logger.warning("no C++ compiler found: the LoRA op uses plain PyTorch (slower); "
                       "install g++ to build loraplex's CPU kernel")
        return None
    try:
        path = _build(compiler)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("loraplex's CPU kernel could not be built (%s): the LoRA op uses plain "
                       "PyTorch (slower)", e)
        return None
    for dtype, name in _ENTRY_NAMES.items():
        entry = getattr(library, name)
        entry.restype = ctypes.c_int
        entry.argtypes = [
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # segments, tokens
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # x
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # A, rank, modules
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # Bt of each module
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # out of each module
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,  # y, threads
        ]
        _ENTRY_POINTS[dtype] = entry
    return library


def _build(compiler: str) -> Path:
    """The compiled library, built now unless this machine's kind already has one."""
    identity = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        identity.update(part + b"\0")
    cache = Path(os.environ.get(CACHE_ENV) or loraplex_home() / CACHE_DIR)
    path = cache / f"lora-{identity.hexdigest()[:24]}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, path)  # atomic: engines starting together never load a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _cpu_flags() -> str:
    """The instruction sets of this CPU (Linux), so a library is only loaded where it runs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()

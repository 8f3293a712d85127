"""Builds and calls loraplex's CPU kernels (float32, bfloat16): lora.cpp, the mixed-adapter LoRA
op (adapter weights in the same dtype, or int8 with scales), decode_attention.cpp, decode
attention over the paged KV cache, fused_stages.cpp (called by kernels/fused_stages.py),
linear_rows.cpp (kernels/linear_rows.py) and decode_layers.cpp (kernels/decode_layers.py).

The sources are compiled together once per machine with the system's C++ compiler (a few
seconds) into `$LORAPLEX_KERNEL_CACHE`, default `<loraplex home>/cache/kernels`, keyed by the
sources, the compiler and the CPU's instruction sets (it is built for this CPU: a home shared
by machines of several kinds gets one library per kind).
Without a compiler, or with LORAPLEX_CPU_KERNEL=0, the LoRA op and attention keep their plain
PyTorch paths, which give the same results, slower; the reason is logged once.
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

KERNEL_DIR = Path(__file__).parent
SOURCES = [KERNEL_DIR / "lora.cpp", KERNEL_DIR / "decode_attention.cpp",
           KERNEL_DIR / "fused_stages.cpp", KERNEL_DIR / "linear_rows.cpp",
           KERNEL_DIR / "decode_layers.cpp"]
HEADERS = [KERNEL_DIR / "vectors.h"]
KERNEL_ENV = "LORAPLEX_CPU_KERNEL"  # "0": never build or use the kernel
CACHE_ENV = "LORAPLEX_KERNEL_CACHE"
CACHE_DIR = "cache/kernels"  # under the loraplex home, without CACHE_ENV
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
_DTYPE_SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}
# (kernel, dtype) -> its entry point, filled by _library(); "add_lora_int8": int8 adapter weights
_ENTRY_POINTS: dict[tuple[str, torch.dtype], Callable[..., int]] = {}

logger = logging.getLogger(__name__)


class KernelError(RuntimeError):
    """The kernel was handed tensors it cannot take (a bug in the caller, never user input)."""


def is_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether add_lora can use the kernel for tensors of this dtype on this device."""
    return device.type == "cpu" and dtype in _DTYPE_SUFFIXES and _library() is not None


@functools.cache
def has_bf16_dot() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512_BF16, AMX, Arm BF16), which
    PyTorch's bfloat16 GEMM uses (kernels/float32_matmul.py is for CPUs without them)."""
    flags = set(_cpu_flags().split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def attention_is_available(dtype: torch.dtype, device: torch.device, num_heads: int,
                           num_kv_heads: int, head_dim: int) -> bool:
    """Whether decode_attention takes this model's attention on this device."""
    return (is_available(dtype, device)
            and _library().decode_attention_takes(num_heads, num_kv_heads, head_dim) == 1)


def add_lora_segments(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: tuple[torch.Tensor, ...],
    segments: torch.Tensor,
    places: torch.Tensor,
    lora_scales: torch.Tensor | None = None,
) -> None:
    """y[t] += the LoRA delta of slot s for every token t in [start, end) of each (s, start,
    end) in segments, reading only slot s's own rows (o, r) = places[s], in place (lora/ops.py
    add_lora's Semantics). A layer that calls it every step holds a LoraKernel instead.

    Shapes: x [num_tokens, in], y [num_tokens, sum out_i], lora_a [n * R, in], lora_b n x [R,
    out_i], segments [m, 3] int64, places [num_slots, 2] int64 (first B row, rank); with int8
    lora_a and lora_b, lora_scales [n * R] float32.
    """
    LoraKernel(lora_a, lora_b, lora_scales)(y, x, segments, places)


class LoraKernel:
    """add_lora_segments bound to one layer's slot buffers, which are checked once here rather
    than on each of the ~120 calls of a decode step: at one decoding token the Python checks
    cost twice the kernel's own work (measured 19 against 9 us a call)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: tuple[torch.Tensor, ...],
                 lora_scales: torch.Tensor | None = None):
        if _library() is None:
            raise KernelError("add_lora_segments: the CPU kernel is not available")
        num_modules = len(lora_b)
        num_rows = lora_b[0].shape[0] if lora_b else 0
        self.dtype = lora_a.dtype if lora_scales is None else None  # int8: the inputs' dtype
        weight_dtype = lora_a.dtype
        matrices, outs = [0, 0, 0], [0, 0, 0]  # up to 3 modules (FUSED_LINEARS)
        ok = (1 <= num_modules <= 3 and lora_a.dim() == 2 and lora_a.is_contiguous()
              and lora_a.shape[0] == num_modules * num_rows
              and (lora_scales is not None) == (weight_dtype == torch.int8))
        if ok and lora_scales is not None:
            ok = (lora_scales.dtype == torch.float32 and lora_scales.is_contiguous()
                  and lora_scales.shape == (num_modules * num_rows,))
        for i, b in enumerate(lora_b if ok else ()):
            ok = (b.dtype == weight_dtype and b.is_contiguous() and b.dim() == 2
                  and b.shape[0] == num_rows)
            if not ok:
                break
            matrices[i], outs[i] = b.data_ptr(), b.shape[1]
        if not ok:
            raise KernelError("add_lora_segments: tensors of unexpected dtype, shape or layout")
        self.in_features, self.out_features = lora_a.shape[-1], sum(outs)
        self.kernel = "add_lora" if lora_scales is None else "add_lora_int8"
        self._tensors = (lora_a, *lora_b, lora_scales)  # kept alive while their pointers are
        # The kernel's weight arguments in its order: rows, A, scales, modules, 3 Bt, 3 outs
        # (also the LoRA fields of a layer's row in kernels/decode_layers.py)
        self.weights = (num_rows, lora_a.data_ptr(),
                        0 if lora_scales is None else lora_scales.data_ptr(), num_modules,
                        *matrices, *outs)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, segments: torch.Tensor,
                 places: torch.Tensor) -> None:
        """add_lora_segments(y, x, <the bound buffers>, segments, places)."""
        dtype = x.dtype
        ok = ((self.dtype is None or dtype == self.dtype) and y.dtype == dtype
              and x.stride(-1) == 1 and y.stride(-1) == 1 and x.shape[-1] == self.in_features
              and y.shape[-1] == self.out_features and y.shape[0] == x.shape[0]
              and segments.dtype == torch.int64 and segments.is_contiguous()
              and segments.dim() == 2 and segments.shape[1] == 3
              and places.dtype == torch.int64 and places.is_contiguous() and places.dim() == 2
              and places.shape[1] == 2)
        entry = _ENTRY_POINTS.get((self.kernel, dtype))
        if not ok or entry is None:
            raise KernelError("add_lora_segments: tensors of unexpected dtype, shape or layout")
        num_rows, a, scales, num_modules, *per_module = self.weights
        status = entry(
            segments.shape[0], segments.data_ptr(), x.shape[0], places.shape[0],
            places.data_ptr(), num_rows, x.data_ptr(), x.stride(0), self.in_features, a,
            scales, num_modules, *per_module, y.data_ptr(), y.stride(0), torch.get_num_threads(),
        )
        if status != 0:
            raise KernelError("add_lora_segments: a segment's slot, tokens or rows are out of "
                              "range")


def quantize_rows(src: torch.Tensor, dst: torch.Tensor, steps: torch.Tensor) -> None:
    """dst = src's rows as int8 and steps = their steps, in place (lora/quantize.py, quantize's
    rows, the same bytes): one pass over src, written straight into dst (a slot's part).

    Shapes: src, dst [outer, inner, cols] with contiguous columns (dst int8, e.g. a slot of a
    slot buffer), steps [outer, inner] float32 contiguous.
    """
    if _library() is None:
        raise KernelError("quantize_rows: the CPU kernel is not available")
    ok = (src.dim() == 3 and dst.shape == src.shape and dst.dtype == torch.int8
          and src.dtype in _DTYPE_SUFFIXES and src.stride(-1) == 1 and dst.stride(-1) == 1
          and steps.shape == src.shape[:2] and steps.dtype == torch.float32
          and steps.is_contiguous())
    if not ok:
        raise KernelError("quantize_rows: tensors of unexpected dtype, shape or layout")
    getattr(_library(), f"quantize_rows_{_DTYPE_SUFFIXES[src.dtype]}")(
        src.data_ptr(), *src.shape, src.stride(0), src.stride(1), dst.data_ptr(), dst.stride(0),
        dst.stride(1), steps.data_ptr(), torch.get_num_threads())


def decode_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_rows: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> None:
    """out[b, h] = softmax(scale * q[b, h] . K[t]) @ V[t] over the cache rows
    kv_rows[b, :lens[b]] of sequence b, the kv head shared by h's group; written in place.

    Shapes: q, out [num_seqs, heads, head_dim] (head_dim contiguous), kv_cache [2, rows,
    kv_heads, head_dim] contiguous (keys, values), kv_rows [num_seqs, width] int64 (rows
    contiguous), lens [num_seqs] int64.
    """
    if _library() is None:
        raise KernelError("decode_attention: the CPU kernel is not available")
    num_seqs, num_heads, head_dim = q.shape
    dtype = q.dtype
    ok = (out.shape == q.shape and out.dtype == dtype and kv_cache.dtype == dtype
          and kv_cache.dim() == 4 and kv_cache.shape[0] == 2 and kv_cache.shape[3] == head_dim
          and kv_cache.is_contiguous() and q.stride(-1) == 1 and out.stride(-1) == 1
          and kv_rows.dtype == torch.int64 and kv_rows.dim() == 2 and kv_rows.stride(-1) == 1
          and kv_rows.shape[0] == num_seqs and lens.dtype == torch.int64
          and lens.shape == (num_seqs,) and lens.is_contiguous())
    if not ok:
        raise KernelError("decode_attention: tensors of unexpected dtype, shape or layout")
    status = _ENTRY_POINTS["decode_attention", dtype](
        num_seqs, num_heads, kv_cache.shape[2], head_dim, q.data_ptr(), q.stride(0),
        q.stride(1), kv_cache.data_ptr(), kv_cache.shape[1], kv_rows.data_ptr(),
        kv_rows.stride(0), lens.data_ptr(), kv_rows.shape[1], scale, out.data_ptr(),
        out.stride(0), out.stride(1), torch.get_num_threads(),
    )
    if status == 1:
        raise KernelError("decode_attention: a length or cache row is out of range")
    if status != 0:
        raise KernelError("decode_attention: a head size or grouping it is not built for")


def entry_point(kernel: str, dtype: torch.dtype, restype, argtypes: tuple) -> Callable[..., int]:
    """The C function `<kernel>_<f32|bf16>` typed with restype and argtypes, for the kernel
    modules beside this one."""
    library = _library()
    if library is None or dtype not in _DTYPE_SUFFIXES:
        raise KernelError(f"{kernel}: the CPU kernel is not available for {dtype}")
    return _typed_entry(library, f"{kernel}_{_DTYPE_SUFFIXES[dtype]}", restype, argtypes)


@functools.cache
def _typed_entry(library: ctypes.CDLL, name: str, restype, argtypes: tuple):
    """Keyed by the library too: a rebuilt library (another build's flags, in the tests) has
    its own entry points."""
    entry = getattr(library, name)
    entry.restype, entry.argtypes = restype, list(argtypes)
    return entry


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(KERNEL_ENV) == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        logger.warning("no C++ compiler found: the LoRA op and decode attention use plain "
                       "PyTorch (slower); install g++ to build loraplex's CPU kernels")
        return None
    try:
        path = _build(compiler)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("loraplex's CPU kernels could not be built (%s): the LoRA op and "
                       "decode attention use plain PyTorch (slower)", e)
        return None
    for dtype, suffix in _DTYPE_SUFFIXES.items():
        for kernel, name in [("add_lora", f"add_lora_{suffix}"),
                             ("add_lora_int8", f"add_lora_{suffix}_int8")]:
            entry = getattr(library, name)
            entry.restype = ctypes.c_int
            entry.argtypes = [
                ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,  # segments, tokens
                ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,  # places, rows
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # x
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # A, scales, modules
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # Bt of each module
                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # out of each module
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,  # y, threads
            ]
            _ENTRY_POINTS[kernel, dtype] = entry
        entry = getattr(library, f"decode_attention_{suffix}")
        entry.restype = ctypes.c_int
        entry.argtypes = [
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # shape
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # q
            ctypes.c_void_p, ctypes.c_int64,  # kv cache, rows in it
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,  # rows, lens
            ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # scale, out
            ctypes.c_int,  # threads
        ]
        _ENTRY_POINTS["decode_attention", dtype] = entry
    for suffix in _DTYPE_SUFFIXES.values():
        entry = getattr(library, f"quantize_rows_{suffix}")
        entry.restype = None
        entry.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 5, ctypes.c_void_p,
                          ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    library.decode_attention_takes.restype = ctypes.c_int
    library.decode_attention_takes.argtypes = [ctypes.c_int64] * 3
    return library


def _build(compiler: str) -> Path:
    """The compiled library, built now unless this machine's kind already has one."""
    identity = hashlib.sha256()
    parts = [path.read_bytes() for path in SOURCES + HEADERS]
    for part in (*parts, compiler.encode(), " ".join(FLAGS).encode(),
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
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp],
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

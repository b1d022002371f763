"""Fused CPU kernels of the block-wise quantized optimizer step, compiled on first use.

``blockwise_adam.cc`` (shipped as package data) does one pass per block of
the gradient: decode the old moment codes, update the moments, take the
block maxima, encode the new moments and write the update. XLA's CPU loop
fusions have one output each, so the XLA path decodes each moment about
three times; on CPU, where the quantized step is bound by arithmetic rather
than memory, the fused pass is what brings it to float32 speed.

The source is compiled lazily, the first time a step is traced with the
kernel, by the system C++ compiler (``$CXX``, else ``c++``, ``g++`` or
``clang++`` on the ``PATH``) with ``-O3 -march=native``, into a per-user
cache directory (``$JAXOPT_NN_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxopt_nn``,
else ``~/.cache/jaxopt_nn``), under a name keyed by a hash of the source, the
jax and jaxlib versions (their FFI headers), the compiler flags and the CPU
(``-march=native``). A cached library is used without a compiler. The
library is written to a temporary file and renamed into place, so processes
building at once never see a partial file; a cached library that does not
load is rebuilt once. Each process registers the targets with XLA once
(:func:`jax.ffi.register_ffi_target`).

:func:`available` says whether this worked; when it did not (no compiler, a
failed build), callers fall back to the XLA path.
"""

import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

_SOURCE = Path(__file__).with_name("blockwise_adam.cc")
# -ffp-contract=off: the compiler fuses no multiply-add on its own. XLA on
# CPU does fuse some (LLVM contracts a multiply feeding an add where the CPU
# has FMA); the kernel calls fma explicitly at exactly those places
# (``MulAdd`` in blockwise_adam.cc), so it rounds as the XLA path does.
# -fno-math-errno lets sqrtf vectorise and changes no result.
_FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
)
_TARGETS = {
    "jaxopt_nn_blockwise_adam": "JaxoptNnBlockwiseAdam",
    "jaxopt_nn_blockwise_rms": "JaxoptNnBlockwiseRms",
}
# Hyperparameters per step, in the order blockwise_adam.cc reads them.
ADAM_HYPER = 9
RMS_HYPER = 4
MODES = {"adam": 0, "nadam": 1, "rms_eps_in_sqrt": 2, "rms_eps_outside": 3}

_log = logging.getLogger(__name__)


class KernelUnavailableError(RuntimeError):
    """The fused CPU kernel could not be built or loaded."""


def _compiler() -> list[str] | None:
    """The C++ compiler command: ``$CXX`` if set (None if it is not found), else the PATH's."""
    if "CXX" in os.environ:
        command = shlex.split(os.environ["CXX"])
        return command if command and shutil.which(command[0]) else None
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if "JAXOPT_NN_CACHE_DIR" in os.environ:
        return Path(os.environ["JAXOPT_NN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxopt_nn"


def _cpu_id() -> str:
    """The CPU's feature flags (``-march=native`` code runs only where they match)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path() -> Path:
    """Where this source, jax version, flag set and CPU's kernel library is cached."""
    key = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes(),
        jax.__version__.encode(),
        importlib.metadata.version("jaxlib").encode(),
        " ".join(_FLAGS).encode(),
        platform.machine().encode(),
        _cpu_id().encode(),
    ):
        key.update(part + b"\0")
    return cache_dir() / f"blockwise_adam-{key.hexdigest()[:24]}.so"


def _build(compiler: list[str], path: Path) -> None:
    """Compile the source to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".build-", suffix=".so")
    os.close(handle)
    try:
        command = [
            *compiler,
            *_FLAGS,
            f"-I{jax.ffi.include_dir()}",
            str(_SOURCE),
            "-o",
            temporary,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode:
            raise KernelUnavailableError(
                f"{shlex.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}"
            )
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _load(path: Path) -> Any:
    import ctypes

    library = ctypes.CDLL(str(path))
    for symbol in _TARGETS.values():
        getattr(library, symbol)  # AttributeError if missing
    return library


def open_library() -> Any:
    """The cached library, built first if it is missing or does not load.

    Raises:
      KernelUnavailableError: no compiler, or the build or the load failed.
    """
    path = library_path()
    try:
        return _load(path)
    except (OSError, AttributeError):
        pass  # missing, or a corrupt file left by something else: build it (again)
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailableError(
            f"no C++ compiler found to build {path.name} (CXX={os.environ.get('CXX')!r}; "
            "looked for c++, g++, clang++ on the PATH)"
        )
    try:
        _build(compiler, path)
        return _load(path)
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        raise KernelUnavailableError(f"could not build or load {path}: {error}") from error


# Held while the library is built and its targets registered: threads that
# trace their first kernel step at once build and register it once.
_REGISTER_LOCK = threading.Lock()


def _register() -> None:
    """Open the library and register its targets once; raises KernelUnavailableError."""
    with _REGISTER_LOCK:
        _register_once()


@functools.cache
def _register_once() -> None:
    library = open_library()
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
            name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered in this process (built on first call)."""
    try:
        _register()
    except KernelUnavailableError as error:
        _log.warning("fused CPU optimizer kernel unavailable, using the XLA path: %s", error)
        return False
    return True


def require() -> None:
    """Build and register the kernel, raising :class:`KernelUnavailableError` if that fails."""
    _register()


def step(
    target: str,
    g: jax.Array,
    moments: list[tuple[jax.Array, jax.Array]],
    hyper: jax.Array,
    *,
    bits: int,
    block_size: int,
    mode: str,
) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """One fused step: the update and each moment's new (codes, scales).

    ``g`` is float32 rows ``(..., n)``; ``moments`` the stored (codes,
    scales) of each moment (Adam: first then second; RMSprop: second);
    ``hyper`` the float32 hyperparameters (see ``blockwise_adam.cc``). Under
    ``jax.vmap`` every operand gets the batch axes in front (``broadcast_all``)
    and the kernel reads one set of hyperparameters per batch entry.
    """
    flat = [x for pair in moments for x in pair]
    out_types = [jax.ShapeDtypeStruct(g.shape, jnp.float32)] + [
        jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat
    ]
    # Every output overwrites its input in place (the update the gradient;
    # each element and block is read before it is written): where the
    # gradient is dead after the step (computed in the same jit, or donated)
    # and the state donated, XLA allocates nothing, and a fresh buffer of
    # the gradient's size would cost more to map than the step's arithmetic.
    aliases = {i: i for i in range(len(flat) + 1)}
    call = jax.ffi.ffi_call(
        target, out_types, vmap_method="broadcast_all", input_output_aliases=aliases
    )
    update, *rest = call(g, *flat, hyper, bits=bits, block_size=block_size, mode=MODES[mode])
    return update, [(rest[i], rest[i + 1]) for i in range(0, len(rest), 2)]

"""Compile a C++ source file against the installed PyTorch into a library of custom operators,
once per machine, and load it.

The library is built with `-march=native`, so it is only valid on the kind of CPU that built it:
its cache key covers the source, the compiler line, PyTorch's version and the CPU's model and
flags. Libraries live under `$WREN_CACHE/kernels` (default `~/.cache/wren/kernels`), written
atomically, so two processes building at once both end with a whole file.

The library links against the OpenMP runtime PyTorch itself loaded: a second copy of the runtime
would bring a second team of worker threads competing for the same cores.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

BUILD_TIMEOUT_S = 300


class BuildError(RuntimeError):
    """The compiler is missing or rejected the source; the message says which and why."""


def cache_dir() -> Path:
    root = (
        os.environ.get("WREN_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wren"
    )
    return Path(root) / "kernels"


def compiler() -> str:
    """The C++ compiler: $CXX, else the first of c++, g++, clang++ on the PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")


def native_macros(cxx: str, march: str) -> set[str]:
    """The macros the compiler predefines for `-march=<march>`: which instruction sets it will use."""
    result = subprocess.run(
        [cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise BuildError(f"{cxx} -march={march} failed: {result.stderr.strip()[-500:]}")
    return {line.split()[1] for line in result.stdout.splitlines() if line.startswith("#define ")}


def build_and_load(source: Path, march: str = "native") -> Path:
    """Build `source` for this machine (unless cached) and load its operators into torch.ops."""
    cxx = compiler()
    command = _command(cxx, source, march)
    library = cache_dir() / f"{source.stem}-{_key(source, command)}.so"
    if not library.exists():
        _compile(command, library)
    torch.ops.load_library(str(library))
    return library


def _command(cxx: str, source: Path, march: str) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    command = [cxx, "-O3", f"-march={march}", "-std=c++20", "-shared", "-fPIC", "-w"]
    command += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    command += ["-I", str(torch_dir / "include"), str(source)]
    openmp = _loaded_openmp_runtime()
    if openmp is not None:
        # -fopenmp compiles at::parallel_for's pragmas; --as-needed drops the compiler's own
        # runtime, since every OpenMP symbol already resolves to PyTorch's (named first).
        command += ["-fopenmp", "-Wl,--as-needed", str(openmp)]
    lib = torch_dir / "lib"
    command += ["-L", str(lib), f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]
    return command


def _loaded_openmp_runtime() -> Path | None:
    """The OpenMP runtime file this process has loaded (PyTorch's), if any (Linux only)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if Path(path).name.startswith(("libgomp", "libiomp", "libomp")):
            return Path(path)
    return None


def _key(source: Path, command: list[str]) -> str:
    digest = hashlib.sha256()
    for part in (
        source.read_bytes(),
        " ".join(command).encode(),
        torch.__version__.encode(),
        _cpu_identity(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _cpu_identity() -> bytes:
    """What tells this CPU's kind apart: -march=native code from another may not run here."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)})).encode()


def _compile(command: list[str], library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    print(f"wren: compiling {library.name} for this CPU (once)", file=sys.stderr)
    fd, partial = tempfile.mkstemp(dir=library.parent, prefix=f".{library.stem}-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run(
            [*command, "-o", partial], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if result.returncode != 0:
            raise BuildError(f"{command[0]} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{command[0]} took longer than {BUILD_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)

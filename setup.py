"""Build the Cython kernels of fastconv.

Every ``fastconv/backends/cython/*.pyx`` becomes an extension module.  OpenMP is
used when the compiler accepts ``-fopenmp`` and silently left out when it does
not (the kernels then run single-threaded).  The kernels are compiled for the
building machine's CPU (``-march=native``) unless ``FASTCONV_PORTABLE=1``.  ``FASTCONV_DEBUG_BUILD=1`` compiles
with Cython's bounds and wrap-around checks switched on and without optimisation,
for the debug CI job.  ``FASTCONV_SANITIZE=address`` (gcc/clang) instruments the kernels
with AddressSanitizer, which also catches out-of-bounds access through raw pointers
(run the tests with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy
from setuptools import Extension, setup

HERE = Path(__file__).parent
DEBUG = os.environ.get("FASTCONV_DEBUG_BUILD", "") not in ("", "0")
PORTABLE = os.environ.get("FASTCONV_PORTABLE", "") not in ("", "0")
SANITIZE = os.environ.get("FASTCONV_SANITIZE", "").strip()


#: modules whose auto-vectorised loops work on 16 lanes at a time (the Winograd transforms): with
#: ``-march=native`` on an AVX-512 machine they are also built with ``-mprefer-vector-width=512``,
#: which GCC's Intel tunings leave at 256 bits (measured on a 2-core Xeon: mnist-c2's Winograd
#: forward pass 1.43 -> 1.12 ms, cifar-64's 4.4 -> 3.6 ms; the other modules, whose hot loops are
#: explicit vectors or short copies, measured alike or up to 8% slower with it, so they keep the
#: default)
WIDE_VECTOR_MODULES = {"_winograd"}

OPENMP_PROBE = "#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n"
PLAIN_PROBE = "int main(void){return 0;}\n"


def _compiler_accepts(flag: str, program: str) -> bool:
    """Compile and link ``program`` with ``flag``; True when that works."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(program)
        try:
            result = subprocess.run(
                [*cc, flag, str(src), "-o", str(Path(tmp) / "probe")],
                capture_output=True,
                timeout=120,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0


def _extensions() -> list[Extension]:
    sources = sorted((HERE / "fastconv" / "backends" / "cython").glob("*.pyx"))
    if not sources:
        return []
    from Cython.Build import cythonize

    if sys.platform == "win32":
        openmp, native, wide = True, False, False
        compile_args = ["/O2", "/openmp"]
        link_args: list[str] = []
    else:
        openmp = _compiler_accepts("-fopenmp", OPENMP_PROBE)
        native = not PORTABLE and _compiler_accepts("-march=native", PLAIN_PROBE)
        compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
        compile_args += ["-fopenmp"] if openmp else []
        compile_args += ["-march=native"] if native else []
        wide = native and _compiler_accepts("-mprefer-vector-width=512", PLAIN_PROBE)
        link_args = ["-fopenmp"] if openmp else []
        if SANITIZE:
            compile_args += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"]
            link_args += [f"-fsanitize={SANITIZE}"]
    print(
        f"fastconv build: OpenMP {'on' if openmp else 'off'}, "
        f"-march=native {'on' if native else 'off'}{' (512-bit vectors preferred in ' + ', '.join(sorted(WIDE_VECTOR_MODULES)) + ')' if wide else ''}, debug {'on' if DEBUG else 'off'}, "
        f"sanitizer {SANITIZE or 'off'}"
    )
    extensions = [
        Extension(
            "fastconv.backends.cython." + src.stem,
            [str(src.relative_to(HERE))],
            include_dirs=[numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=compile_args + (["-mprefer-vector-width=512"] if wide and src.stem in WIDE_VECTOR_MODULES
                                               else []),
            extra_link_args=link_args,
        )
        for src in sources
    ]
    directives = {
        "language_level": 3,
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": not DEBUG,
    }
    return cythonize(
        extensions,
        compiler_directives=directives,
        compile_time_env={"FASTCONV_OPENMP": openmp, "FASTCONV_DEBUG": DEBUG},
    )


setup(ext_modules=_extensions())

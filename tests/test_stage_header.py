"""``fastconv/backends/cython/_stage.h`` on its own: its vector tile store (GCC >= 12 / Clang
shuffles) and the plain-loop fallback that other compilers get must both put every element
where the scalar definition says, for clipped tiles, strided (dilated) columns and partial lane
groups, in float and double.  Compiled with the C compiler that builds the extensions."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

HEADER = Path(__file__).resolve().parents[1] / "fastconv" / "backends" / "cython" / "_stage.h"

PROGRAM = r"""
#include "%(header)s"
#include <stdio.h>
#include <stdlib.h>

#define CHECK(T, SUFFIX)                                                                     \
    static int check_##SUFFIX(unsigned seed) {                                               \
        enum { TB = 48, SIZE = 4096 };                                                        \
        static T blk[16 * TB], out[SIZE], ref[SIZE];                                          \
        ptrdiff_t offs[16], rows[16], cols[16];                                               \
        int bad = 0;                                                                          \
        srand(seed);                                                                          \
        for (int trial = 0; trial < 200; trial++) {                                           \
            const int n = 1 + rand() %% 16;                                                   \
            const ptrdiff_t step = 1 + rand() %% 3, ld = 4 * step + rand() %% 9;             \
            for (int i = 0; i < 16 * TB; i++) blk[i] = (T)(rand() %% 1000) - 500;             \
            for (int i = 0; i < SIZE; i++) out[i] = ref[i] = -1;                               \
            for (int l = 0; l < 16; l++) {                                                    \
                offs[l] = l * (4 * ld + 4 * step); rows[l] = 1 + rand() %% 4; cols[l] = 1 + rand() %% 4; \
            }                                                                                 \
            fc_tiles_out_##SUFFIX(blk, TB, out, offs, rows, cols, n, ld, step);              \
            for (int l = 0; l < n; l++)                                                       \
                for (ptrdiff_t i = 0; i < rows[l]; i++)                                       \
                    for (ptrdiff_t j = 0; j < cols[l]; j++)                                   \
                        ref[offs[l] + i * ld + j * step] = blk[(i * 4 + j) * TB + l];         \
            for (int i = 0; i < SIZE; i++) bad += out[i] != ref[i];                           \
        }                                                                                     \
        return bad;                                                                           \
    }
CHECK(float, f)
CHECK(double, d)

int main(void) {
    char src[300], dst[300];
    int bad = check_f(1) + check_d(2);
    for (int n = 0; n < 300; n++) {  /* fc_copy: every size, nothing written past it */
        for (int i = 0; i < 300; i++) { src[i] = (char)(i * 7 + 1); dst[i] = 0; }
        fc_copy(dst, src + 3, (size_t)n);
        for (int i = 0; i < 300; i++) bad += dst[i] != (i < n ? src[i + 3] : 0);
    }
    printf("%%d\n", bad);
    return bad != 0;
}
"""


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "").split()
    for name in ([cc[0]] if cc else []) + ["cc", "gcc", "clang"]:
        if shutil.which(name):
            return name
    return None


@pytest.mark.parametrize("flags", [[], ["-DFC_NO_SHUFFLE"]], ids=["vector", "fallback"])
def test_tile_store_and_copy_match_their_definition(tmp_path, flags):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler")
    source = tmp_path / "stage.c"
    source.write_text(PROGRAM % {"header": HEADER.as_posix()})
    binary = tmp_path / "stage"
    subprocess.run([cc, "-O2", *flags, str(source), "-o", str(binary)], check=True, capture_output=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "0", run.stdout + run.stderr

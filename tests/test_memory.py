import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from skpatchcore._memory import empty


def _vm_flags(array: np.ndarray) -> set[str]:
    """The kernel's VmFlags of the mapping holding ``array``'s middle byte.

    numpy advises the huge-page-aligned part of an array only, a mapping of its own.
    """
    address = array.__array_interface__["data"][0] + array.nbytes // 2
    flags = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(part, 16) for part in head.split("-"))
                inside = lo <= address < hi
            elif head == "VmFlags:" and inside:
                flags = set(line.split()[1:])
    return flags


def _huge_page_advice() -> str:
    """JSON ``[empty's VmFlags, np.empty's VmFlags]`` for one accurate-preset batch."""
    shape = (4, 64, 64, 344)  # 22.5 MB, one accurate-preset batch of 4 images' features
    out = empty(shape)
    out[...] = 1.0
    reference = np.empty(shape, np.float32)
    return json.dumps([sorted(_vm_flags(out)), sorted(_vm_flags(reference))])


def test_empty_is_a_writeable_float32_array():
    out = empty((2, 3, 4))
    assert out.shape == (2, 3, 4) and out.dtype == np.float32 and out.flags.writeable


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux only)")
def test_empty_is_not_advised_huge_pages_where_numpy_would():
    # In a fresh interpreter: here, the C allocator may hand out again memory that
    # an earlier test's numpy array had advised huge (seen once in a full run).
    code = "from tests.test_memory import _huge_page_advice; print(_huge_page_advice())"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True, check=True
    )
    ours, numpys = json.loads(run.stdout.splitlines()[-1])
    if "hg" not in numpys:
        pytest.skip("this numpy or kernel does not advise huge pages")
    assert "hg" not in ours

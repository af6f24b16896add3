import sys

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux only)")
def test_empty_is_float32_and_not_advised_huge_pages_where_numpy_would():
    shape = (4, 64, 64, 344)  # 22.5 MB, one accurate-preset batch of 4 images' features
    out = empty(shape)
    assert out.shape == shape and out.dtype == np.float32 and out.flags.writeable
    out[...] = 1.0
    reference = np.empty(shape, np.float32)
    if "hg" not in _vm_flags(reference):
        pytest.skip("this numpy or kernel does not advise huge pages")
    assert "hg" not in _vm_flags(out)

"""The explanation job's fixed mmap threshold (`delib_jax._malloc.bound_heap`, issue 33): a large block freed and
asked for again is mapped again (and returned when freed) instead of coming from the heap, which keeps it. Each case
runs in a fresh interpreter: the setting holds for the rest of a process."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
    reason="glibc's malloc",
)

# an 8 MB block (a batch's temporaries) allocated and freed twice, then held: is it mapped (mallinfo2's hblkhd)?
BLOCKS = """
import ctypes
from delib_jax import _malloc
if {call}:
    print(_malloc.bound_heap(), _malloc.bound_heap(4096), flush=True)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = Info
for _ in range(2):
    libc.free(libc.malloc(8 << 20))
block = libc.malloc(8 << 20)
print("mapped" if libc.mallinfo2().hblkhd >= 8 << 20 else "heap", flush=True)
libc.free(block)
"""


def third_block(call: bool, env: dict | None = None) -> list[str]:
    """What `bound_heap()` returned twice (when ``call``), and where the third 8 MB block came from."""
    run = subprocess.run([sys.executable, "-c", BLOCKS.format(call=call)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=120, check=True)  # fmt: skip
    return run.stdout.split("\n")[:-1]


def test_a_freed_large_block_is_mapped_again_not_kept_in_the_heap():
    assert third_block(True) == [f"{1 << 20} {1 << 20}", "mapped"]  # the first call's threshold stands
    assert third_block(False) == ["heap"]  # glibc's default: the threshold rose to 8 MB at the first free


def test_the_users_malloc_mmap_threshold_stands():
    assert third_block(True, {"MALLOC_MMAP_THRESHOLD_": str(64 << 20)}) == ["None None", "heap"]

"""unireg.memory: freed heap handed back to the system between pipeline stages."""
import platform

from unireg.memory import release_freed_memory


def test_freed_heap_memory_is_returned_where_glibc_can():
    """The pipeline calls this after refinement (a clinical-size pair's peak memory, bench/full_size.py)."""
    assert release_freed_memory() is (platform.libc_ver()[0] == "glibc")

"""Host 2 MiB huge pages for guest RAM (``memory-backend-memfd,hugetlb=on``).

The pool (``vm.nr_hugepages``) is raised for the run when too few pages are free and
given back afterwards; without root, or when the kernel cannot find the memory, the run
stops with a harness error that says so.
"""

from __future__ import annotations

from pathlib import Path

from .errors import HarnessError

HUGE_PAGE_MIB = 2
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
MEMINFO = Path("/proc/meminfo")


def free_huge_pages() -> int:
    """HugePages_Free of the default (2 MiB) size."""
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


class HugePageReservation:
    """Enough free 2 MiB pages for ``mib`` of guest RAM until :meth:`release`."""

    def __init__(self, mib: int) -> None:
        if mib % HUGE_PAGE_MIB:
            raise HarnessError(f"guest RAM of {mib} MiB is not a multiple of 2 MiB huge pages")
        self.needed = mib // HUGE_PAGE_MIB
        self.restore_to: int | None = None
        missing = self.needed - free_huge_pages()
        if missing > 0:
            before = int(NR_HUGEPAGES.read_text())
            try:
                NR_HUGEPAGES.write_text(str(before + missing))
            except OSError as error:
                raise HarnessError(f"--host-hugetlb needs {self.needed} free 2 MiB pages, "
                                   f"{free_huge_pages()} are free and vm.nr_hugepages cannot "
                                   f"be raised ({error}): run as root or reserve them") from None
            self.restore_to = before
            found = free_huge_pages()
            if found < self.needed:
                self.release()
                raise HarnessError(f"--host-hugetlb: the kernel found only "
                                   f"{found} of {self.needed} 2 MiB pages")

    def release(self) -> None:
        """Give back what was added to the pool (pages still in use stay until freed)."""
        if self.restore_to is not None:
            NR_HUGEPAGES.write_text(str(self.restore_to))
            self.restore_to = None

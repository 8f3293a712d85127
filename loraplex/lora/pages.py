"""The page pool behind adapter slots: memory by rank.

A page is `page_rank` rank rows of every module's A and B at every layer (lora/slots.py lays
them out). An adapter of rank r takes ceil(r / page_rank) pages, so a rank-8 adapter costs an
eighth of a rank-64 one, where a slot sized for max_lora_rank would cost them the same (the
waste vLLM #2847 and SGLang #31305 describe). This is S-LoRA's unified paging with one
difference: an adapter's pages are one contiguous run, so the LoRA op and the CPU kernel read
each adapter's matrices as one stretch of memory (the kernel prefetches the next adapter's
matrices at a fixed distance) and a slot is just (first row, rank). The price is
fragmentation: free pages scattered in gaps too short for a run. `compact` answers it by
sliding every run down to the front, a copy within the buffers, cheaper than the activation
that needs it, which copies the whole adapter from host memory anyway.

Invariant: the runs are disjoint and inside [0, num_pages), and num_free + the pages of every
run == num_pages.
"""

from dataclasses import dataclass

# Rank rows per page (EngineConfig.lora_page_rank): the commonest small rank, so that ranks 8,
# 16, 32, 64 waste nothing and the pool's bookkeeping stays a few hundred runs at most.
DEFAULT_PAGE_RANK = 8


class PageError(RuntimeError):
    """A page request the pool cannot meet (the caller should have made room first)."""


def pages_for(rank: int, page_rank: int) -> int:
    """Pages an adapter of this rank takes."""
    return -(-rank // page_rank)


@dataclass(frozen=True)
class Move:
    """One run slid down by `compact`: its pages [source, source + count) go to [target, ...)."""

    owner: int
    source: int
    target: int
    count: int


class PagePool:
    """Contiguous runs of pages, at most one per owner (a slot number)."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise PageError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.runs: dict[int, tuple[int, int]] = {}  # owner -> (first page, count)

    @property
    def num_used(self) -> int:
        return sum(count for _, count in self.runs.values())

    @property
    def num_free(self) -> int:
        return self.num_pages - self.num_used

    def gaps(self) -> list[tuple[int, int]]:
        """(first page, count) of each maximal stretch of free pages, in address order."""
        gaps, cursor = [], 0
        for first, count in sorted(self.runs.values()):
            if first > cursor:
                gaps.append((cursor, first - cursor))
            cursor = first + count
        if cursor < self.num_pages:
            gaps.append((cursor, self.num_pages - cursor))
        return gaps

    def can_allocate(self, count: int) -> bool:
        """Whether `count` pages fit, compacting first if need be."""
        return 0 < count <= self.num_free

    def allocate(self, owner: int, count: int) -> int | None:
        """The first page of a new run of `count` pages for owner, or None when no gap is long
        enough (see `compact`). Best fit: the shortest gap that holds it, so long gaps stay
        whole for large adapters."""
        if owner in self.runs:
            raise PageError(f"owner {owner} already holds pages {self.runs[owner]}")
        if count < 1:
            raise PageError(f"a run needs at least one page, got {count}")
        fitting = [(length, first) for first, length in self.gaps() if length >= count]
        if not fitting:
            return None
        _, first = min(fitting)
        self.runs[owner] = (first, count)
        return first

    def free(self, owner: int) -> None:
        self.runs.pop(owner, None)

    def compact(self) -> list[Move]:
        """Slide every run down to the front, in address order, so the free pages are one gap at
        the end. Applying the moves in the order given never writes over a run that has not
        moved yet (a move may overlap its own source)."""
        moves, cursor = [], 0
        for owner, (first, count) in sorted(self.runs.items(), key=lambda item: item[1]):
            if first != cursor:
                moves.append(Move(owner, first, cursor, count))
                self.runs[owner] = (cursor, count)
            cursor += count
        return moves

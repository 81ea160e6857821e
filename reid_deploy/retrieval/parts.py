"""Row ranges worked on in threads, one per CPU thread torch may use (``torch.get_num_threads()``).

numpy and scipy release the GIL in their loops, so the CPU-side set algebra of re-ranking, single-threaded
otherwise, uses every core that way. Each range runs the same code as one pass would and the results come
back in order, so they are the same bits whatever the number of threads.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import scipy.sparse as sp
import torch

T = TypeVar("T")
ROWS = 1024  # fewest rows of set algebra worth a thread of their own, unless a caller says otherwise


def threads() -> int:
    """How many threads the set algebra uses: as many as torch may (``torch.set_num_threads`` limits both)."""
    return torch.get_num_threads()


def in_parts(work: Callable[[slice], T], n: int, min_rows: int | None = None) -> list[T]:
    """``work`` over consecutive slices covering range(n), at most one per thread and none shorter than
    ``min_rows`` (default ``ROWS``; unless n is): its results, in order."""
    parts = max(1, min(threads(), n // max(ROWS if min_rows is None else min_rows, 1)))
    bounds = [n * p // parts for p in range(parts + 1)]
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    if parts == 1:
        return [work(slices[0])]
    with ThreadPoolExecutor(parts) as pool:
        return list(pool.map(work, slices))


def stacked_in_parts(work: Callable[[slice], sp.csr_matrix], n: int, min_rows: int | None = None
                     ) -> sp.csr_matrix:
    """``in_parts`` of a ``work`` that gives CSR rows: its rows one after another."""
    found = in_parts(work, n, min_rows)
    return found[0] if len(found) == 1 else sp.vstack(found, format="csr")


def joined_in_parts(work: Callable[[slice], tuple[np.ndarray, ...]], n: int, min_rows: int | None = None
                    ) -> tuple[np.ndarray, ...]:
    """``in_parts`` of a ``work`` that gives a tuple of arrays: each array of the parts, concatenated."""
    found = in_parts(work, n, min_rows)
    return found[0] if len(found) == 1 else tuple(np.concatenate(x) for x in zip(*found))

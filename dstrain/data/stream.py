"""The training data as one indexed sequence of records across files, and its shuffled order per epoch.

`Corpus` numbers the valid records of all files 0..n-1 (file by file) and reads any of them with one
`pread` (a JSONL line or a JSON array's element) or from a small per-process cache of decoded row groups (Parquet): nothing holds a whole file.

`EpochOrder` is the global sample order of an epoch without an n-sized permutation: records are cut into
blocks of `block` consecutive ids, the blocks are permuted, and the records of each window of `window`
consecutive permuted blocks are shuffled together. Position p of the epoch is found by a binary search over
the window boundaries and a shuffle of one window, so seeking to any position costs the same at 1% or 99%.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from dstrain.data.index import FileIndex, parquet_columns
from dstrain.data.records import BadRecord, Record, decode_line, parse_record, parse_text
from dstrain.errors import DataError

ROW_GROUP_CACHE = 64  # decoded Parquet row groups kept per process: a shuffle window touches few of them


class UnreadableRecordError(DataError):
    """A record that no longer reads as indexed; `bad` says where and why."""

    def __init__(self, bad: BadRecord) -> None:
        super().__init__(str(bad))
        self.bad = bad


class Corpus:
    """Random access to the valid records of `files`, in file order."""

    def __init__(self, files: Sequence[FileIndex]) -> None:
        self.files = list(files)
        self.starts = np.cumsum([0] + [len(f) for f in self.files])
        self._fds: dict[int, int] = {}
        self._pid = -1
        self._groups: OrderedDict[tuple[int, int], list[dict]] = OrderedDict()
        self._parquet: dict[int, tuple[object, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_bad(self) -> int:
        return sum(f.num_bad for f in self.files)

    @property
    def num_cleaned(self) -> int:
        """Valid records whose text data.clean changed (NFC, control characters, trailing white space)."""
        return sum(f.num_cleaned for f in self.files)

    def locate(self, i: int) -> tuple[int, int]:
        """(file number, record number within the file) of global record i."""
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        file_no = int(np.searchsorted(self.starts, i, side="right")) - 1
        return file_no, i - int(self.starts[file_no])

    def sizes_of(self, ids: np.ndarray) -> np.ndarray:
        """Stored sizes of records `ids` (what length grouping sorts by), read from the memory-mapped
        index: no array over all records is ever built."""
        ids = np.asarray(ids, dtype=np.int64)
        file_nos = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.zeros(len(ids), dtype=np.int64)
        for file_no in np.unique(file_nos):
            at = file_nos == file_no
            out[at] = self.files[file_no].lengths[ids[at] - self.starts[file_no]]
        return out

    def origin(self, i: int) -> tuple[str, int]:
        file_no, local = self.locate(i)
        return self.files[file_no].path, int(self.files[file_no].lines[local])

    def read(self, i: int) -> Record:
        """Record i, parsed and validated again; a file that changed since indexing is a clear error."""
        file_no, local = self.locate(i)
        index = self.files[file_no]
        try:
            if index.is_parquet:
                return parse_record(
                    self._parquet_row(file_no, int(index.offsets[local])), index.fmt, index.clean
                )
            raw = self._pread(file_no, int(index.offsets[local]), int(index.lengths[local]))
            text, error = decode_line(raw, first=int(index.offsets[local]) == 0)
            if error is not None or not text:
                raise ValueError(error or "blank line")
            return parse_text(text, index.fmt, index.clean)
        except (ValueError, OSError) as exc:
            reason = (
                f"{exc}: the file no longer matches its index, it changed during the run. Keep training "
                "data unchanged while a run (or its resume) uses it."
            )
            raise UnreadableRecordError(
                BadRecord(index.path, int(index.lines[local]), reason, fatal=True)
            ) from None

    def _fd(self, file_no: int) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own descriptors
            self._fds, self._groups, self._parquet, self._pid = {}, OrderedDict(), {}, os.getpid()
        if file_no not in self._fds:
            self._fds[file_no] = os.open(self.files[file_no].path, os.O_RDONLY)
        return self._fds[file_no]

    def _pread(self, file_no: int, offset: int, length: int) -> bytes:
        raw = os.pread(self._fd(file_no), length, offset)
        if len(raw) != length:
            raise OSError(f"short read: {len(raw)} of {length} bytes at offset {offset}")
        return raw

    def _parquet_row(self, file_no: int, row: int) -> dict:
        import pyarrow.parquet as pq

        self._fd(file_no)  # resets the caches after a fork
        index = self.files[file_no]
        if file_no not in self._parquet:
            source = pq.ParquetFile(index.path)
            ends = np.cumsum([source.metadata.row_group(g).num_rows for g in range(source.num_row_groups)])
            self._parquet[file_no] = (source, ends)
        source, ends = self._parquet[file_no]
        group = int(np.searchsorted(ends, row, side="right"))
        key = (file_no, group)
        if key not in self._groups:
            columns = parquet_columns(index.path, index.fmt)
            self._groups[key] = source.read_row_group(group, columns=columns).to_pylist()
            if len(self._groups) > ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key][row - (int(ends[group - 1]) if group else 0)]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(
            _fds={}, _pid=-1, _groups=OrderedDict(), _parquet={}
        )  # descriptors do not travel to workers
        return state


class EpochOrder:
    """The shuffled order of records 0..n-1 for one epoch; O(n / block) memory, O(block * window) per seek."""

    def __init__(self, n: int, seed: int, epoch: int, block: int = 128, window: int = 64) -> None:
        self.n, self.seed, self.epoch, self.block, self.window = n, seed, epoch, block, window
        num_blocks = -(-n // block)
        self.perm = np.random.Generator(np.random.PCG64([seed, epoch, 0])).permutation(num_blocks)
        sizes = np.minimum(block, n - self.perm * block)
        ends = np.cumsum(sizes)
        # start position of each window (and n at the end)
        self.bounds = np.concatenate([[0], ends[window - 1 :: window], [n] if num_blocks % window else []])
        self._cached: tuple[int, np.ndarray] | None = None

    def _window(self, w: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != w:
            blocks = self.perm[w * self.window : (w + 1) * self.window]
            ids = np.concatenate(
                [np.arange(b * self.block, min((b + 1) * self.block, self.n)) for b in blocks]
            )
            np.random.Generator(np.random.PCG64([self.seed, self.epoch, 1 + w])).shuffle(ids)
            self._cached = (w, ids)
        return self._cached[1]

    def ids(self, start: int, stop: int) -> list[int]:
        """The records at positions [start, stop) of this epoch."""
        return ids_in_windows(start, stop, self.n, self._locate, self._window)

    def _locate(self, pos: int) -> tuple[int, int, int]:
        w = int(np.searchsorted(self.bounds, pos, side="right")) - 1
        return w, int(self.bounds[w]), int(self.bounds[w + 1])


def ids_in_windows(
    start: int,
    stop: int,
    n: int,
    locate: Callable[[int], tuple[int, int, int]],
    window: Callable[[int], np.ndarray],
) -> list[int]:
    """Records at positions [start, stop) of an epoch of `n` laid out in windows: `locate(pos)` gives
    (window, its first position, its end), `window(w)` the records of window w in order."""
    if not 0 <= start <= stop <= n:
        raise IndexError(f"positions [{start}, {stop}) of an epoch of {n}")
    out: list[int] = []
    pos = start
    while pos < stop:
        w, begin, end = locate(pos)
        take = min(stop, end)
        out += window(w)[pos - begin : take - begin].tolist()
        pos = take
    return out

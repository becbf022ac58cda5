"""Per-file record index: where each valid record starts, its line, and every bad record with its reason.

Built once per (file, format) by one validating pass, then cached on disk and memory-mapped, so a run reads
any record with one `pread` and never holds a data file in memory. The cache entry records the file's size
and mtime; a file that changed is indexed again. JSONL files are scanned in parallel byte ranges cut at
line ends; a JSON array is scanned element by element (`json_array`: each element's byte range is stored
just like a JSONL line's, its "line" is the line it starts on); Parquet files are indexed per row group (the
record's "line" is its 1-based row number). The index also counts the records that cleaning changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from dstrain import storage
from dstrain.data import json_array, records
from dstrain.data.records import BadRecord, decode_json, decode_line, over_long_bytes, parse_counted
from dstrain.errors import DataError

INDEX_VERSION = 3  # 3: JSON arrays indexed by element, cleaning (data.clean) in the key, num_cleaned
PARALLEL_FROM_BYTES = 32 * 1024 * 1024  # below this a process pool costs more than it saves
KEPT_BAD = 1000  # bad records held in memory per file (all are counted, and all are in the cache's bad.jsonl)
FIELDS = {"preference": ("query", "retrieval_result", "chosen", "rejected"), "sft-rag": ("query", "retrieval_result", "answer"), "messages": ("messages",), "kto": ("query", "retrieval_result", "answer", "label")}  # fmt: skip


@dataclass
class FileIndex:
    """Valid records of one file: `offsets[i]` (byte offset, or row for Parquet), `lengths[i]` (bytes of
    the JSONL line, or the record's text size for Parquet: what data.group_by_length sorts by), `lines[i]`."""

    path: str
    fmt: str
    offsets: np.ndarray
    lengths: np.ndarray
    lines: np.ndarray
    bad: list[BadRecord]  # the first KEPT_BAD of them
    num_bad: int
    num_cleaned: int = 0  # valid records that data.clean changed (NFC, control characters, trailing space)
    clean: bool = True  # whether records are cleaned as they are read (data.clean)

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def is_parquet(self) -> bool:
        return is_parquet(self.path)


def is_parquet(path: str | Path) -> bool:
    return str(path).lower().endswith((".parquet", ".pq"))


# ------------------------------------------------------------------------------------------- scanning


@dataclass
class RangeScan:
    offsets: list[int]
    lengths: list[int]
    lines: list[int]  # 1-based within the range
    bad: list[tuple[int, str]]  # (line within the range, reason)
    num_lines: int
    num_cleaned: int = 0


def read_bounded_line(fh, limit: int) -> tuple[bytes, int]:
    """One line of at most `limit` bytes, and its full length in the file (longer lines are skipped over)."""
    raw = fh.readline(limit)
    size = len(raw)
    if size == limit and not raw.endswith(b"\n"):
        while True:  # an over-long line: measure it without holding it
            rest = fh.readline(1024 * 1024)
            size += len(rest)
            if not rest or rest.endswith(b"\n"):
                break
    return raw, size


def scan_jsonl_range(path: str, fmt: str, start: int, end: int, limit: int, clean: bool = True) -> RangeScan:
    """Validate every line that starts in [start, end); lines over `limit` bytes are bad."""
    scan = RangeScan([], [], [], [], 0)
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        while pos < end:
            raw, size = read_bounded_line(fh, limit + 2)
            if not size:
                break
            scan.num_lines += 1
            here, pos = pos, pos + size
            if size == len(raw):
                text, error = decode_line(raw, first=here == 0, limit=limit)
            else:
                text, error = None, over_long_bytes(size, limit)
            if text == "":
                continue  # blank line
            try:
                if error is not None:
                    raise ValueError(error)
                _, changed = parse_counted(decode_json(text), fmt, clean)
            except ValueError as exc:
                scan.bad.append((scan.num_lines, str(exc)))
                continue
            scan.num_cleaned += changed
            scan.offsets.append(here)
            scan.lengths.append(size)
            scan.lines.append(scan.num_lines)
    return scan


def split_points(path: str, parts: int) -> list[int]:
    """Byte offsets that cut the file into about `parts` ranges, each starting at a line start."""
    size = Path(path).stat().st_size
    points = [0]
    with open(path, "rb") as fh:
        for k in range(1, parts):
            fh.seek(max(points[-1], size * k // parts))
            if fh.tell() > 0:
                fh.seek(fh.tell() - 1)
                fh.readline()  # to the start of the next line (or stay, if a line starts here)
            points.append(min(fh.tell(), size))
    points.append(size)
    return sorted(set(points))


def scan_jsonl(
    path: str, fmt: str, workers: int, min_parallel_bytes: int = PARALLEL_FROM_BYTES, clean: bool = True
) -> FileIndex:
    points = split_points(path, workers if Path(path).stat().st_size >= min_parallel_bytes else 1)
    ranges = list(itertools.pairwise(points))
    limit = records.MAX_RECORD_BYTES  # read now: worker processes see only the module's default
    jobs = [(path, fmt, a, b, limit, clean) for a, b in ranges]
    if len(jobs) > 1:
        # spawn: the caller may hold torch threads or a tokenizer pool, which fork would copy half-alive
        with ProcessPoolExecutor(len(jobs), mp_context=get_context("spawn")) as pool:
            scans = list(pool.map(scan_jsonl_range, *zip(*jobs, strict=True)))
    else:
        scans = [scan_jsonl_range(*job) for job in jobs]
    offsets, lengths, lines, bad, before = [], [], [], [], 0
    for scan in scans:
        offsets.append(np.asarray(scan.offsets, dtype=np.int64))
        lengths.append(np.asarray(scan.lengths, dtype=np.int64))
        lines.append(np.asarray(scan.lines, dtype=np.int64) + before)
        bad += [BadRecord(path, line + before, reason) for line, reason in scan.bad]
        before += scan.num_lines
    cleaned = sum(scan.num_cleaned for scan in scans)
    return FileIndex(path, fmt, _cat(offsets), _cat(lengths), _cat(lines), bad, len(bad), cleaned, clean)


def scan_json_array(path: str, fmt: str, clean: bool = True) -> FileIndex:
    """Validate element by element in one streaming pass; each element's bytes are stored like a line's."""
    offsets, lengths, lines, bad, cleaned = [], [], [], [], 0
    for element in json_array.iter_elements(path, records.MAX_RECORD_BYTES):
        try:
            if element.error is not None:
                raise ValueError(element.error)
            _, changed = parse_counted(element.value, fmt, clean)
        except ValueError as exc:
            reason = str(exc) if element.error else f"element {element.number}: {exc}"
            bad.append(BadRecord(path, element.line, reason))
            continue
        cleaned += changed
        offsets.append(element.offset)
        lengths.append(element.length)
        lines.append(element.line)
    arrays = (np.asarray(values, dtype=np.int64) for values in (offsets, lengths, lines))
    return FileIndex(path, fmt, *arrays, bad, len(bad), cleaned, clean)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def parquet_columns(path: str, fmt: str) -> list[str]:
    import pyarrow.parquet as pq

    names = set(pq.ParquetFile(path).schema_arrow.names)
    return [name for name in FIELDS[fmt] if name in names]


def scan_parquet(path: str, fmt: str, clean: bool = True) -> FileIndex:
    """Validate row group by row group; a record's offset is its row number in the file."""
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    columns = parquet_columns(path, fmt)
    rows, sizes, bad, row, cleaned = [], [], [], 0, 0
    for group in range(source.num_row_groups):
        for obj in source.read_row_group(group, columns=columns).to_pylist():
            row += 1
            try:
                cleaned += parse_counted(obj, fmt, clean)[1]
                rows.append(row - 1)
                sizes.append(len(str(obj)))  # the text size: what data.group_by_length sorts by
            except ValueError as exc:
                bad.append(BadRecord(path, row, str(exc)))
    offsets = np.asarray(rows, dtype=np.int64)
    lengths = np.asarray(sizes, dtype=np.int64)
    return FileIndex(path, fmt, offsets, lengths, offsets + 1, bad, len(bad), cleaned, clean)


def scan_file(path: str, fmt: str, workers: int = 0, clean: bool = True) -> FileIndex:
    """Index one file; a file that cannot be read at all (a broken Parquet footer, say) is one DataError."""
    workers = workers or min(8, os.cpu_count() or 1)
    kind = "Parquet" if is_parquet(path) else "JSONL"
    try:
        if is_parquet(path):
            return scan_parquet(path, fmt, clean)
        if json_array.sniff(path) == "array":
            kind = "JSON array"
            return scan_json_array(path, fmt, clean)
        return scan_jsonl(path, fmt, workers, clean=clean)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise DataError(f"{path}: cannot be read as a {kind} file ({exc})") from None


# ------------------------------------------------------------------------------------------- caching


def cache_root() -> Path:
    """$DSTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/dstrain, else ~/.cache/dstrain; indexes live in index/."""
    explicit = os.environ.get("DSTRAIN_CACHE_DIR")
    if explicit:
        return Path(explicit) / "index"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dstrain" / "index"


def fingerprint(path: str, fmt: str, clean: bool = True) -> dict[str, object]:
    stat = Path(path).stat()
    return {
        "path": str(Path(path).resolve()),
        "format": fmt,
        "clean": clean,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "version": INDEX_VERSION,
        "max_record_bytes": records.MAX_RECORD_BYTES,
    }


def cache_dir(root: Path, print_: dict[str, object]) -> Path:
    key = hashlib.sha256(f"{print_['path']}\0{print_['format']}\0{print_['clean']}".encode()).hexdigest()[:24]
    return root / key


def load_cached(where: Path, path: str, print_: dict[str, object]) -> FileIndex | None:
    """The cached index if it was built from this very file state, else None."""
    try:
        meta = json.loads((where / "meta.json").read_text(encoding="utf-8"))
        if meta.get("fingerprint") != print_:
            return None
        arrays = {n: np.load(where / f"{n}.npy", mmap_mode="r") for n in ("offsets", "lengths", "lines")}
        bad = list(_read_bad(where / "bad.jsonl", path, KEPT_BAD))
    except (OSError, ValueError, KeyError):
        return None  # unreadable or half-written by some other tool: rebuild
    counts = {"num_bad": int(meta["num_bad"]), "num_cleaned": int(meta["num_cleaned"])}
    return FileIndex(path, str(print_["format"]), **arrays, bad=bad, **counts, clean=bool(print_["clean"]))


def _read_bad(file: Path, path: str, limit: int | None) -> Iterator[BadRecord]:
    with file.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if limit is not None and i >= limit:
                return
            number, reason = json.loads(line)
            yield BadRecord(path, number, reason)


def iter_bad(index: FileIndex) -> Iterator[BadRecord]:
    """Every bad record of an indexed file (from the cache when more were found than are kept in memory)."""
    if index.num_bad <= len(index.bad):
        yield from index.bad
        return
    print_ = fingerprint(index.path, index.fmt, index.clean)
    yield from _read_bad(cache_dir(cache_root(), print_) / "bad.jsonl", index.path, None)


def store(where: Path, index: FileIndex, print_: dict[str, object], all_bad: list[BadRecord]) -> None:
    """Write the entry into a temp dir, then rename it into place: readers see all of it or none."""
    needed = sum(getattr(index, name).nbytes for name in ("offsets", "lengths", "lines")) + 4096
    with storage.guard(storage.cache_place(where.parent), "the data index cache", where, needed):
        write_entry(where, index, print_, all_bad)


def write_entry(where: Path, index: FileIndex, print_: dict[str, object], all_bad: list[BadRecord]) -> None:
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{where.name}.", dir=where.parent))
    try:
        for name in ("offsets", "lengths", "lines"):
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(index, name)))
        with (tmp / "bad.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps([b.line, b.reason], ensure_ascii=False) + "\n" for b in all_bad)
        meta = {
            "fingerprint": print_,
            "num_records": len(index),
            "num_bad": index.num_bad,
            "num_cleaned": index.num_cleaned,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if where.exists():
            shutil.rmtree(where)
        tmp.rename(where)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """One builder per entry across processes (every rank of a node asks for the same files at once)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def index_file(
    path: str | Path, fmt: str, workers: int = 0, use_cache: bool = True, clean: bool = True
) -> FileIndex:
    """The index of `path` read as `fmt` (cleaned as data.clean says): from the cache when the file is
    unchanged, else built (and cached)."""
    path = str(path)
    print_ = fingerprint(path, fmt, clean)
    if not use_cache:
        return scan_file(path, fmt, workers, clean)
    root = cache_root()
    where = cache_dir(root, print_)
    try:
        # No space or no permission there is one error naming the cache and DSTRAIN_CACHE_DIR
        place = storage.cache_place(root)
        with storage.guard(place, "the data index cache", where), _locked(root / f"{where.name}.lock"):
            cached = load_cached(where, path, print_)
            if cached is not None:
                return cached
            index = scan_file(path, fmt, workers, clean)
            store(where, index, print_, index.bad)
    except OSError as exc:  # any other unusable cache (e.g. a file in its place) costs time, not the run
        print(
            f"warning: index cache {root} unusable ({exc.strerror or exc}); indexing in memory",
            file=sys.stderr,
        )
        return scan_file(path, fmt, workers, clean)
    index.bad = index.bad[:KEPT_BAD]
    return index

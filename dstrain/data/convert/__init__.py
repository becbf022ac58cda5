"""Upstream RAG data into dstrain's formats (`dstrain convert`).

One small module per upstream family (`ddr`, `kbalign`, `rageval`, `raft`, `alpaca`, `sharegpt`), each a
function registered in `registry` with the dstrain formats it can produce and how to recognise its records;
`sources` streams JSON Lines and JSON arrays; `pipeline` maps, validates (as training does), counts and
writes atomically. Python API: `convert_files(paths, family, to, out, Options(...))`.
"""

from dstrain.data.convert import alpaca, ddr, kbalign, raft, rageval, sharegpt  # noqa: F401 - they register
from dstrain.data.convert.pipeline import Summary, convert_files
from dstrain.data.convert.registry import CONVERTERS, Drop, Options, register

__all__ = ["CONVERTERS", "Drop", "Options", "Summary", "convert_files", "register"]

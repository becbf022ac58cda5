"""What a command's `--json` prints: one JSON object on a stdout nothing else writes to.

Libraries print to stdout as they load (DeepSpeed's logger announces the accelerator there): a script piping
`dstrain ... --json` into `jq` must still get one object. While the command works, stdout is stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO


@contextlib.contextmanager
def json_stdout(enabled: bool = True) -> Iterator[TextIO]:
    """Within the block, prints go to stderr (when `enabled`); yields the real stdout for the object."""
    real = sys.stdout
    if not enabled:
        yield real
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield real


def print_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    out.flush()

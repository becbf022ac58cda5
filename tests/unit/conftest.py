"""Shared fixtures for the unit tests: no process group, no DeepSpeed engine, no subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstrain.config.run import ModelConfig


@pytest.fixture(scope="session")
def tokenizer():
    """The tokenizer of the bundled tiny model (loaded once: building it is the slow part)."""
    from dstrain.model.build import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture
def write_jsonl(tmp_path: Path):
    """Write JSON objects (or raw str/bytes lines) as a JSONL file; returns its path."""

    def write(lines: list, name: str = "data.jsonl", newline: str = "\n") -> Path:
        chunks = []
        for line in lines:
            if isinstance(line, bytes):
                chunks.append(line)
            elif isinstance(line, str):
                chunks.append(line.encode("utf-8"))
            else:
                chunks.append(json.dumps(line, ensure_ascii=False).encode("utf-8"))
        path = tmp_path / name
        path.write_bytes(b"".join(chunk + newline.encode() for chunk in chunks))
        return path

    return write

"""Precomputed reference log-probs (`objective.precompute_reference`).

DPO, IPO, DPO+NLL and KTO compare the policy with a fixed reference: here the same model with its adapter
disabled. Its log-probs of each training pair never change, so instead of a reference forward in every step
they can be computed once, in one pass before step 1, and looked up after: each training step then runs the
policy alone. The table (chosen, rejected) per training record (KTO: (answer, mismatched answer) per
example, the mismatched answer fixed per example by data/kto.py, so z0's reference half is in it too) lives in the dstrain cache, keyed by what
determines it (model, tokenisation settings, the training files' fingerprints), so later epochs, resumes and
new runs on the same data and model reuse it.

The pass is sharded over ranks like the eval loop (equal batch counts, ZeRO-3 forwards are collectives)
and summed into the full table on every rank.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from safetensors import safe_open
from safetensors.torch import save_file

from dstrain import engine as eng
from dstrain.checkpoint.atomic import atomic_file
from dstrain.config.run import RunConfig
from dstrain.data.index import cache_root, fingerprint
from dstrain.data.loader import TokenizedCorpus, collate_micro
from dstrain.data.pairs import split_pair
from dstrain.data.records import BadRecord
from dstrain.data.sharding import equal_rank_batches
from dstrain.distributed.collectives import all_ranks_ok, all_reduce_sum
from dstrain.distributed.sequence import rank_in_group

TABLE_VERSION = 1


def table_key(cfg: RunConfig, dataset: TokenizedCorpus) -> str:
    """Everything the reference log-probs depend on; the adapter and the schedule are not among them."""
    data = cfg.data
    depends: dict[str, object] = {
        "format": data.format,
        "max_seq_len": data.max_seq_len,
        "max_passage_tokens": data.max_passage_tokens,
        "prompt_template": data.prompt_template,
        "chat_template": data.chat_template,
        "prompt_fill": "one pass",  # before: a passage's literal {query} was replaced by the query
    }
    if data.chat_template:  # 2: answers as the template renders them, through its end-of-turn token
        depends["chat_answers"] = 2
    if dataset.kto:  # KTO examples: each answer and its mismatched answer (data/kto.py), per record
        depends["kto_examples"] = {"per_record": dataset.kto, "partner": "half the records away"}
    payload = {
        "version": TABLE_VERSION,
        "model": asdict(cfg.model),
        "data": depends,
        # each file in the format it is read as (a mixture source may have its own)
        "files": [fingerprint(index.path, index.fmt, index.clean) for index in dataset.corpus.files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def table_path(key: str) -> Path:
    return cache_root().parent / "reference" / f"{key}.safetensors"


def load_table(path: Path, num_records: int) -> torch.Tensor | None:
    """The cached table if it is readable and of the right size, else None (then it is recomputed)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            table = fh.get_tensor("logps")
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    return table if tuple(table.shape) == (num_records, 2) else None


def store_table(path: Path, table: torch.Tensor) -> None:
    """Written atomically: a reader sees the whole table or none. An unwritable cache costs a rerun."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({"logps": table.contiguous()}, str(tmp))
    except OSError as exc:
        print(
            f"warning: cannot cache reference log-probs at {path} ({exc}); the next run recomputes them",
            file=sys.stderr,
        )


@torch.no_grad()
def compute_table(
    engine: DeepSpeedEngine, dataset: TokenizedCorpus, micro: int, rank: int, world: int, pad_id: int
) -> torch.Tensor:
    """[len(dataset), 2] summed log-probs of (chosen, rejected) under the adapter-disabled model (KTO:
    (answer, mismatched answer))."""
    table = torch.zeros(len(dataset), 2, dtype=torch.float32)
    with eng.evaluating(engine):
        for indices, _ in equal_rank_batches(range(len(dataset)), micro, rank, world):
            items = [dataset[i] for i in indices]
            # Bad records (and an empty batch on a short share) leave a filler pair: the forward still runs.
            good = [i for i in items if not isinstance(i, BadRecord)]
            share = dataset.cfg.share_prompt
            batch = collate_micro(good, pad_id, pairs=True, share_prompt=share, kto=bool(dataset.kto))
            _, reference, _ = eng.forward(engine, batch.inputs, pairs=True, policy=False)
            chosen, rejected = split_pair(reference.float().cpu())
            for row, index in enumerate(batch.indices):
                table[index, 0], table[index, 1] = chosen[row], rejected[row]
    if rank_in_group():  # a sequence-parallel group's ranks all hold its rows: its first rank adds them
        table.zero_()
    return all_reduce_sum(table).cpu()


def reference_table(
    cfg: RunConfig,
    engine: DeepSpeedEngine,
    dataset: TokenizedCorpus,
    micro: int,
    rank: int,
    world: int,
    pad_id: int,
    is_local_main: bool,
) -> tuple[torch.Tensor, str]:
    """The table, from the cache when every rank finds it there, else computed (and cached); with a note."""
    path, what = table_path(table_key(cfg, dataset)), "examples" if dataset.kto else "pairs"
    cached = load_table(path, len(dataset))
    # Computing is a collective: all ranks compute, or none does.
    if all_ranks_ok(cached is not None):
        return cached, f"reference log-probs of {len(dataset):,} {what} loaded from {path}"
    started = time.perf_counter()
    table = compute_table(engine, dataset, micro, rank, world, pad_id)
    if is_local_main:
        store_table(path, table)
    took = time.perf_counter() - started
    return table, f"reference log-probs of {len(dataset):,} {what} computed in {took:.1f} s, cached at {path}"


def lookup(table: torch.Tensor, indices: list[int], like: torch.Tensor) -> torch.Tensor:
    """Per-row reference log-probs [2B] (chosen rows, then rejected) for a pair batch of `indices`.

    A batch without real pairs (every record bad) has one filler pair without answer tokens: zeros.
    """
    if not indices:
        return torch.zeros(2, dtype=like.dtype, device=like.device)
    rows = table[torch.tensor(indices)]
    return torch.cat([rows[:, 0], rows[:, 1]]).to(device=like.device, dtype=like.dtype)

"""Generated RAG workloads for the framework benchmarks: SFT and preference records, their token statistics,
and the `Workload` every framework run is described by (written as JSON for the HF/TRL worker ranks).

Split from bench_common.py (launching, throughput, tables), which builds on it.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY = REPO / "dstrain" / "assets" / "tiny"
BUNDLED_DATA = REPO / "dstrain" / "assets" / "data"
PROMPT_TEMPLATE = "Background:\n{passages}\n\nQuestion: {query}\nAnswer:"  # dstrain's default (SPEC s.2)


# ------------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """Everything the frameworks must agree on; serialised to JSON for the worker processes."""

    data: str  # JSONL: sft-rag records, or preference records
    model: str  # HF model dir (random init weights + the bundled tokenizer)
    ds_config: str  # fully resolved ZeRO JSON (no "auto")
    steps: int  # optimizer steps every framework trains
    warmup: int  # steps left out of the timing
    micro: int = 4
    max_seq_len: int = 512
    max_passage_tokens: int = 384
    lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    dtype: str = "fp32"  # fp32 | bf16
    beta: float = 0.1
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        return path

    @staticmethod
    def load(path: str | Path) -> Workload:
        return Workload(**json.loads(Path(path).read_text(encoding="utf-8")))


def log_every(work: Workload) -> int:
    """The logging interval of every framework: the end of warm-up, then every `log_every` steps. The same
    steps everywhere (dstrain, HF Trainer, TRL), and few of them, so logging weighs alike in every clock."""
    return math.gcd(work.warmup, work.steps) if work.warmup else work.steps


def vocabulary() -> list[str]:
    """Words of the bundled data files: text the bundled tokenizer was trained on (few tokens per word)."""
    words: set[str] = set()
    for path in sorted(BUNDLED_DATA.glob("*.jsonl")):
        words.update(re.findall(r"[A-Za-z]+", path.read_text(encoding="utf-8")))
    return sorted(words)


def _sentence(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choices(words, k=rng.randint(lo, hi)))


def write_sft_records(path: Path, count: int, seed: int = 0) -> Path:
    """sft-rag records shaped like SPEC section 6: ~181 tokens each, the answer ~15% of them.

    1-3 passages of 10-34 words, a 6-14 word query, a 5-15 word answer (lengths picked by measuring the
    bundled tokenizer: ~2.5 tokens per word of this vocabulary).
    """
    rng, words = random.Random(seed), vocabulary()
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(count):
            record = {
                "query": _sentence(rng, words, 6, 14) + "?",
                "retrieval_result": [_sentence(rng, words, 10, 34) + "." for _ in range(rng.randint(1, 3))],
                "answer": _sentence(rng, words, 5, 15) + ".",
            }
            fh.write(json.dumps(record) + "\n")
    return path


def write_long_sft_records(
    path: Path, count: int, seed: int = 0, words_per_passage: tuple[int, int] = (150, 300)
) -> Path:
    """Long-context sft-rag records for GPU runs: 4-6 passages (cut to max_passage_tokens, e.g. 1,600) and a
    30-100 word answer (~75-250 tokens), so rows of ~1,800 tokens fit max_seq_len 2048 uncut."""
    rng, words = random.Random(seed), vocabulary()
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(count):
            record = {
                "query": _sentence(rng, words, 6, 14) + "?",
                "retrieval_result": [
                    _sentence(rng, words, *words_per_passage) + "." for _ in range(rng.randint(4, 6))
                ],
                "answer": _sentence(rng, words, 30, 100) + ".",
            }
            fh.write(json.dumps(record) + "\n")
    return path


def write_filler_records(path: Path, n: int) -> Path:
    """sft-rag records whose passages fill max_passage_tokens, so every row reaches ~max_seq_len (memory_bench:
    the estimate's worst case). Ten plain words, 2 passages of 400 each, a 40-word answer."""
    rng = random.Random(0)
    words = ["the", "of", "river", "city", "north", "bank", "paper", "model", "light", "water"]
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            passages = [" ".join(rng.choices(words, k=400)) for _ in range(2)]
            answer = " ".join(rng.choices(words, k=40))
            out.write(json.dumps({"query": f"q {i}?", "retrieval_result": passages, "answer": answer}) + "\n")
    return path


def write_preference_records(
    path: Path,
    count: int,
    seed: int = 0,
    passage_words: tuple[int, int] = (40, 70),
    answer_words: tuple[int, int] = (5, 15),
) -> Path:
    """Preference RAG records (SPEC s.2): a long shared prompt (3-5 passages), two short answers."""
    rng, words = random.Random(seed), vocabulary()
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(count):
            record = {
                "query": _sentence(rng, words, 6, 14) + "?",
                "retrieval_result": [
                    _sentence(rng, words, *passage_words) + "." for _ in range(rng.randint(3, 5))
                ],
                "chosen": {"text": _sentence(rng, words, *answer_words) + "."},
                "rejected": {"text": _sentence(rng, words, *answer_words) + "."},
            }
            fh.write(json.dumps(record) + "\n")
    return path


def token_stats(data: Path, fmt: str, max_seq_len: int, max_passage_tokens: int) -> dict[str, float]:
    """Mean tokens per row and answer share, tokenised exactly as dstrain does (for the report)."""
    from dstrain.config.run import DataConfig
    from dstrain.data.batches import tokenize_rag
    from dstrain.data.records import parse_text

    tokenizer = load_tokenizer()
    cfg = DataConfig(format=fmt, max_seq_len=max_seq_len, max_passage_tokens=max_passage_tokens)
    total = answer = rows = 0
    for line in data.read_text(encoding="utf-8").splitlines():
        example = tokenize_rag(tokenizer, parse_text(line, fmt), cfg)
        total += len(example.input_ids)
        answer += sum(1 for label in example.labels if label != -100)
        rows += 1
    return {"rows": rows, "mean_tokens": total / rows, "answer_share": answer / max(total, 1)}


def pair_stats(data: Path, max_seq_len: int, max_passage_tokens: int) -> dict[str, float]:
    """Mean prompt / answer tokens of preference pairs, tokenised as dstrain does, and the shared-row saving."""
    from dstrain.config.run import DataConfig
    from dstrain.data.pairs import tokenize_pair
    from dstrain.data.records import parse_text

    tokenizer = load_tokenizer()
    cfg = DataConfig(format="preference", max_seq_len=max_seq_len, max_passage_tokens=max_passage_tokens)
    sums = {"prompt": 0, "chosen": 0, "rejected": 0}
    pairs = 0
    for line in data.read_text(encoding="utf-8").splitlines():
        try:
            pair = tokenize_pair(tokenizer, parse_text(line, "preference"), cfg)
        except ValueError:  # over-long prompt: the frameworks report it themselves
            continue
        sums["prompt"] += len(pair.prompt_ids)
        sums["chosen"] += len(pair.chosen_ids)
        sums["rejected"] += len(pair.rejected_ids)
        pairs += 1
    mean = {key: value / max(pairs, 1) for key, value in sums.items()}
    return {
        "pairs": pairs,
        **mean,
        "shared": mean["prompt"] + mean["chosen"] + mean["rejected"],
        "unshared": 2 * mean["prompt"] + mean["chosen"] + mean["rejected"],
    }


def load_tokenizer() -> Any:
    """The bundled tokenizer, with dstrain's pad rule (pad = EOS when unset), as all frameworks use it."""
    from dstrain.config.run import ModelConfig
    from dstrain.model.build import load_tokenizer as dstrain_tokenizer

    return dstrain_tokenizer(ModelConfig())


def rendered_prompt(tokenizer: Any, record: dict[str, Any], max_passage_tokens: int) -> str:
    """The RAG prompt text exactly as dstrain renders it (passages cut by tokens), for TRL's datasets."""
    from dstrain.data.prompts import render_rag_prompt

    return render_rag_prompt(
        tokenizer, PROMPT_TEMPLATE, record["query"], record["retrieval_result"], max_passage_tokens
    )

"""A generated retrieval-grounded task for checking that a setup learns (tests, bench/learning_bench.py).

Every record asks for the code of one entity. One passage gives it; the distractor passages, about other
entities, give none. Entity and code are drawn afresh for every record from vocabulary words of the tokenizer
(each a single token after a space), so no answer can be memorised: it can only be read out of the passages.
Preference records pair that code (chosen) with a code of the same pool that no passage mentions (rejected):
a fluent, well-formed hallucination, which DPO must learn to rank below the grounded answer. KTO records are
unpaired: each record carries one of the two, alternately, labelled desirable (the grounded code) or not.

The harder variant, where every distractor passage carries a code of its own and the query's entity must be
matched, stays at chance for the 2-layer bundled model under LoRA (measured: 28% top-1 among 3 in-context
codes after 4,000 steps); this task is sized so that a few CPU minutes show learning, not to rank models.

`python -m dstrain.data.synthetic OUT_DIR` writes sft-rag, preference and kto train/eval files for the bundled
model.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from dstrain.config.demo import asset
from dstrain.model.build import builtin_dir

PASSAGE = "Code of {entity}: {code}."
WITHDRAWN = "Code of {entity}: withdrawn."
QUERY = "What is the code of {entity}?"


@dataclass(frozen=True)
class TaskSpec:
    passages: int = 3  # one answering passage and passages - 1 distractors, in random order
    train: int = 2000
    eval: int = 200
    seed: int = 0
    # Pool sizes; 0: all of its half of the eligible words (~170 each for builtin:tiny). A small code pool
    # lets a model score well by guessing the pool's words instead of reading the passage.
    entities: int = 0
    codes: int = 0


# Words of the prompt template and the sentences above: as codes they would read as part of the format.
RESERVED = {"Answer", "Background", "Question", "What", "The"}


def single_token_words(tokenizer: PreTrainedTokenizerBase, min_chars: int = 4) -> list[str]:
    """Capitalised words that the tokenizer keeps whole after a space, sorted for determinism."""
    words = []
    for token in tokenizer.get_vocab():
        word = tokenizer.convert_tokens_to_string([token])
        if not word.startswith(" ") or not word[1:].isalpha() or len(word) <= min_chars:
            continue
        if word.strip() in RESERVED:
            continue
        if word[1].isupper() and tokenizer(word, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)
        ]:
            words.append(word.strip())
    return sorted(words)


def split_vocab(words: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Disjoint entity and code pools, so a code never doubles as an entity name."""
    shuffled = sorted(words)
    random.Random(seed).shuffle(shuffled)
    half = len(shuffled) // 2
    return shuffled[:half], shuffled[half:]


def make_record(rng: random.Random, entities: list[str], codes: list[str], n_passages: int) -> dict[str, Any]:
    names = rng.sample(entities, n_passages)
    code, hallucinated = rng.sample(codes, 2)
    passages = [WITHDRAWN.format(entity=e) for e in names[1:]]
    passages.insert(rng.randrange(n_passages), PASSAGE.format(entity=names[0], code=code))
    return {
        "query": QUERY.format(entity=names[0]),
        "retrieval_result": passages,
        "answer": code,
        "rejected": hallucinated,
    }


def generate(tokenizer: PreTrainedTokenizerBase, spec: TaskSpec) -> dict[str, list[dict[str, Any]]]:
    """{"train": [...], "eval": [...]} base records (query, passages, answer, rejected)."""
    entities, codes = split_vocab(single_token_words(tokenizer), spec.seed)
    entities, codes = entities[: spec.entities or None], codes[: spec.codes or None]
    rng = random.Random(spec.seed)
    return {
        split: [make_record(rng, entities, codes, spec.passages) for _ in range(n)]
        for split, n in (("train", spec.train), ("eval", spec.eval))
    }


def as_sft(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("query", "retrieval_result", "answer")}


def as_preference(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "query": record["query"],
        "retrieval_result": record["retrieval_result"],
        "chosen": {"text": record["answer"]},
        "rejected": {"text": record["rejected"]},
    }


def as_kto(record: dict[str, Any], desirable: bool) -> dict[str, Any]:
    """The grounded code labelled desirable, or the hallucinated one labelled undesirable."""
    answer = record["answer"] if desirable else record["rejected"]
    return {**as_sft(record), "answer": answer, "label": desirable}


def write_task(
    out_dir: Path, tokenizer: PreTrainedTokenizerBase, spec: TaskSpec = TaskSpec()
) -> dict[str, Path]:
    """{sft,preference,kto}_{train,eval}.jsonl under out_dir; returns their paths (keys like "kto_train")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, records in generate(tokenizer, spec).items():
        kinds = {
            "sft": map(as_sft, records),
            "preference": map(as_preference, records),
            "kto": (as_kto(r, desirable=i % 2 == 0) for i, r in enumerate(records)),  # half of each label
        }
        for kind, rows in kinds.items():
            path = out_dir / f"{kind}_{split}.jsonl"
            lines = (json.dumps(row, ensure_ascii=False) for row in rows)
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            paths[f"{kind}_{split}"] = path
    return paths


def run_config(
    objective: str,
    files: dict[str, Path],
    output_dir: Path,
    steps: int,
    eval_every: int,
    model_path: str = "builtin:tiny",
) -> dict[str, Any]:
    """The run config of a learning check: `sft` (scored by greedy exact match on held-out answers), a
    preference objective (scored by held-out preference accuracy) or kto on the unpaired records (scored by
    the held-out desirable-minus-undesirable reward margin). `model_path`: the base, e.g. an SFT run's
    `dstrain export --merge` for KTO, which (as in TRL's recipe) starts from a model that already answers."""
    preference = objective != "sft"
    split = "kto" if objective == "kto" else "preference" if preference else "sft"
    best = {"sft": "eval_exact_match", "kto": "eval_reward_margin"}.get(objective, "eval_pref_acc")
    return {
        "model": {"path": model_path, "dtype": "fp32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "train": [str(files[f"{split}_train"])],
            "eval": [str(files[f"{split}_eval"])],
            "format": {"sft": "sft-rag"}.get(split, split),
            "max_seq_len": 128,
            "max_passage_tokens": 96,
        },
        # beta 0.5: at 0.1 the 2-layer model stays longer on the plateau where chosen and hallucinated codes
        # rise together (BENCHMARKS.md, learning check).
        "objective": {"name": objective, "beta": 0.5} if preference else {"name": "sft"},
        "train": {
            "max_steps": steps,
            "log_every": eval_every,
            "eval_every": eval_every,
            "save_every": 0,
            "global_batch_size": 16,
            "eval_generate": 0 if preference else 10_000,
            "eval_max_new_tokens": 8,
            "best_metric": best,
        },
        "ds_config": asset("demo", "ds_config.json"),
        "output_dir": str(output_dir),
    }


def main(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    if len(argv) != 1:
        print("usage: python -m dstrain.data.synthetic OUT_DIR", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(str(builtin_dir("tiny")))
    for name, path in write_task(Path(argv[0]), tokenizer).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

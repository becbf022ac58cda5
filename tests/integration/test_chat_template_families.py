"""A real run with data.chat_template on a Gemma-2 model dir whose tokenizer carries Gemma-2's own template,
which refuses a system role: the run trains, and its log says once that system messages were folded."""

from __future__ import annotations

import json
from pathlib import Path

from dstrain.config.run import ModelConfig
from dstrain.model.build import load_tokenizer
from tests.families import VOCAB, write_family
from tests.helpers import check, metrics, train_single, write_config

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "chat_templates"
GEMMA_TOKENS = ["<start_of_turn>", "<end_of_turn>"]


def gemma2_dir(path: Path) -> Path:
    """A Gemma-2 model dir (tests/families.py) with the bundled tokenizer given Gemma's turn tokens and template."""
    write_family("gemma2", path, vocab_size=VOCAB + len(GEMMA_TOKENS))
    tokenizer = load_tokenizer(ModelConfig())
    tokenizer.add_tokens(GEMMA_TOKENS, special_tokens=True)
    tokenizer.chat_template = (TEMPLATES / "gemma2.jinja").read_text()
    tokenizer.save_pretrained(path)
    return path


def conversations(path: Path, n: int) -> Path:
    rivers = ["Quodalam", "Tafadresh", "Drialourn", "Diazei"]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            river = rivers[i % len(rivers)]
            messages = [
                {"role": "system", "content": "Answer with the lake's name only."},
                {"role": "user", "content": f"Into which lake does the river {river} flow? ({i})"},
                {"role": "assistant", "content": f"Lake {river[::-1].title()}."},
            ]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_gemma2_template_trains_with_the_system_role_folded(tmp_path):
    model = gemma2_dir(tmp_path / "gemma2")
    files = {
        "train": conversations(tmp_path / "train.jsonl", 16),
        "eval": conversations(tmp_path / "eval.jsonl", 4),
    }
    config = write_config(
        tmp_path,
        files,
        model={"path": str(model), "dtype": "fp32"},
        data={"format": "messages", "chat_template": True, "max_seq_len": 128, "max_passage_tokens": 64},
        train={"max_steps": 2, "save_every": 0, "global_batch_size": 4},
    )
    proc = check(train_single(config, cwd=tmp_path))
    log = proc.stdout + proc.stderr
    assert log.count("has no system role: system messages are folded into the first user turn") == 1, log[
        -4000:
    ]
    rows = metrics(tmp_path / "run")
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert any("eval_loss" in row for row in rows)

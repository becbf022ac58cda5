"""User-caused failures exit non-zero with one clear message and no traceback (real `dstrain` processes)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import assert_clean_failure, dstrain, write_config


def test_unknown_key(tmp_path, small_data):
    config = write_config(tmp_path, small_data, lora={"rank": 8})
    assert_clean_failure(dstrain("train", "--config", str(config), cwd=tmp_path), "lora.rank", "lora.r")


def test_every_config_problem_is_reported_at_once(tmp_path, small_data):
    config = write_config(tmp_path, small_data, lora={"rank": 8, "dropout": "high"}, train={"max_stepz": 3})
    proc = dstrain("train", "--config", str(config), cwd=tmp_path)
    assert_clean_failure(proc, "3 problems", "lora.rank", "lora.dropout", "train.max_stepz")


def test_batch_arithmetic_that_does_not_add_up(tmp_path, small_data):
    from dstrain.config.zero import find_ds_config

    ds = json.loads(find_ds_config("zero2.json").read_text())
    ds.update(train_batch_size=10, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    (tmp_path / "bad.json").write_text(json.dumps(ds))
    config = write_config(
        tmp_path, small_data, ds_config=str(tmp_path / "bad.json"), train={"global_batch_size": 0}
    )
    proc = dstrain("train", "--config", str(config), cwd=tmp_path)
    assert_clean_failure(proc, "batch sizes do not add up", "train_batch_size=10")


def test_missing_model_path(tmp_path, small_data):
    config = write_config(tmp_path, small_data, model={"path": str(tmp_path / "no-such-model")})
    assert_clean_failure(
        dstrain("train", "--config", str(config), cwd=tmp_path), "model.path", "no-such-model"
    )


def test_missing_data_file(tmp_path, small_data):
    config = write_config(tmp_path, {"train": tmp_path / "nope.jsonl", "eval": small_data["eval"]})
    assert_clean_failure(dstrain("train", "--config", str(config), cwd=tmp_path), "data.train", "nope.jsonl")


def test_missing_config_file(tmp_path):
    assert_clean_failure(
        dstrain("train", "--config", str(tmp_path / "x.yaml"), cwd=tmp_path), "x.yaml", "not found"
    )


def test_bad_data_record_names_path_and_line(tmp_path, small_data):
    lines = small_data["train"].read_text(encoding="utf-8").splitlines()
    lines[2] = '{"query": "q", "retrieval_result": ["p"]}'
    small_data["train"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = write_config(tmp_path, small_data)
    proc = dstrain("train", "--config", str(config), cwd=tmp_path)
    assert_clean_failure(proc, f"{small_data['train']}:3: missing field 'answer'", "data.on_error=skip")


def test_debug_shows_the_traceback(tmp_path, small_data):
    config = write_config(tmp_path, small_data, lora={"rank": 8})
    proc = dstrain("--debug", "train", "--config", str(config), cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("fmt", ["sft-rag", "preference"])
def test_validate_data_exit_codes(tmp_path, fmt):
    from dstrain.config.demo import asset

    clean = asset("data", "sft_rag_eval.jsonl" if fmt == "sft-rag" else "preference_eval.jsonl")
    ok = dstrain("validate-data", clean, "--format", fmt, cwd=tmp_path)
    assert ok.returncode == 0 and "0 bad" in ok.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"query": "q"}\n\nnot json\n\xff\xfe\n')
    proc = dstrain("validate-data", str(bad), "--format", fmt, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"{bad}:1: missing field")
    assert lines[1].startswith(f"{bad}:3: invalid JSON")
    assert lines[2].startswith(f"{bad}:4: undecodable bytes")
    assert lines[3] == f"{bad}: 3 records, 0 ok, 3 bad"


def test_output_dir_that_cannot_be_created(tmp_path, small_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = write_config(tmp_path, small_data, output_dir=str(blocker / "run"))
    assert_clean_failure(
        dstrain("train", "--config", str(config), cwd=tmp_path), "output_dir", "cannot create"
    )


def test_validate_data_refuses_empty_files_and_directories(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    proc = dstrain("validate-data", str(empty), "--format", "sft-rag", cwd=tmp_path)
    assert proc.returncode == 1 and "holds no records" in proc.stdout
    proc = dstrain("validate-data", str(tmp_path), "--format", "sft-rag", cwd=tmp_path)
    assert proc.returncode == 1 and "a directory; pass one JSONL or Parquet file" in proc.stderr


def test_export_of_a_dir_without_checkpoints(tmp_path):
    proc = dstrain("export", str(tmp_path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and "no checkpoints" in proc.stderr and "Traceback" not in proc.stderr

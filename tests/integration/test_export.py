"""`dstrain export`: the adapter dir loads in PEFT, the merged dir in plain transformers, with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from dstrain.checkpoint.report import base_info
from dstrain.config.run import ModelConfig
from dstrain.model.build import load_base_model
from tests.helpers import check, dstrain, train_single, ulps_at_largest, write_config

# fp32 throughout; merging W + B@A changes only the summation order of the same products, which moves
# logits of magnitude ~10 by up to ~2e-5 after the layers compound it (measured; ~20 ulps of the largest
# logit). The bound is in ulps of the largest logit so that it follows their magnitude (a fixed 1e-4 broke at
# 1.22e-4 in the 4-bit twin of this test, tests/unit/model/test_qlora.py).
MERGE_ULPS = 1024


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from tests.helpers import make_small_data

    tmp = tmp_path_factory.mktemp("export")
    # alpha 64 (scale 8): 4 warm-up-dominated steps move the logits well past the merge bound below
    lora = {"r": 8, "alpha": 64, "dropout": 0.0}
    cfg = write_config(tmp, make_small_data(tmp), lora=lora, train={"max_steps": 4, "save_every": 4})
    check(train_single(cfg, cwd=tmp))
    return tmp / "run"


def probe() -> torch.Tensor:
    return torch.randint(7, 2000, (2, 20), generator=torch.Generator().manual_seed(5))


def reference_logits(ckpt: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(load_base_model(ModelConfig(dtype="fp32")), str(ckpt)).eval()
    with torch.no_grad():
        return model(input_ids=probe()).logits


def test_adapter_export_loads_in_peft(trained: Path, tmp_path: Path):
    out = tmp_path / "adapter"
    proc = check(dstrain("export", str(trained), "--out", str(out), cwd=tmp_path))
    assert "exported adapter from" in proc.stdout and "step-00000004" in proc.stdout
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    model = PeftModel.from_pretrained(load_base_model(ModelConfig(dtype="fp32")), str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=probe()).logits
    assert torch.equal(logits, reference_logits(trained / "checkpoints" / "step-00000004"))
    assert torch.equal(auto_peft_logits(out), logits)  # and by itself, with the base it names


def test_a_builtin_runs_adapter_loads_by_itself_from_any_directory(
    trained: Path, tmp_path: Path, monkeypatch
):
    # adapter_config.json names the installed package's copy of builtin:tiny, which transformers loads
    ckpt = trained / "checkpoints" / "step-00000004"
    monkeypatch.chdir(tmp_path)
    assert torch.equal(auto_peft_logits(ckpt), reference_logits(ckpt))
    base = base_info(ckpt)  # what `dstrain inspect` shows: where the base is, and how to load it elsewhere
    assert base["found"] and "builtin:tiny" in base["note"] and "load_base_model" in base["note"]


def auto_peft_logits(adapter: Path) -> torch.Tensor:
    """The adapter loaded with the base its adapter_config.json names, as PEFT users load one."""
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=probe()).logits


@pytest.mark.numerics
def test_merged_export_loads_in_transformers_with_the_same_logits(trained: Path, tmp_path: Path):
    out = tmp_path / "merged"
    check(
        dstrain(
            "export",
            str(trained / "checkpoints" / "step-00000004"),
            "--out",
            str(out),
            "--merge",
            cwd=tmp_path,
        )
    )
    assert (
        (out / "model.safetensors").is_file()
        and not list(out.glob("*.bin"))
        and not list(out.glob("adapter_*"))
    )
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(input_ids=probe()).logits
    reference = reference_logits(trained / "checkpoints" / "step-00000004")
    tolerance = ulps_at_largest(reference, MERGE_ULPS)
    torch.testing.assert_close(logits, reference, rtol=0, atol=tolerance)
    # the same greedy token wherever the reference's best two are further apart than the merge may move
    # them (a near tie may break either way on another CPU's rounding)
    best, second = reference.topk(2, dim=-1).values.unbind(-1)
    clear = best - second > 2 * tolerance
    assert clear.any() and torch.equal(logits.argmax(-1)[clear], reference.argmax(-1)[clear])
    base = load_base_model(ModelConfig(dtype="fp32")).eval()
    with torch.no_grad():
        moved = (base(input_ids=probe()).logits - reference).abs().max().item()
    assert moved > 10 * tolerance, moved  # training changed the logits, by more than the bound hides


def test_export_refuses_to_overwrite_and_names_bad_checkpoints(trained: Path, tmp_path: Path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    proc = dstrain("export", str(trained), "--out", str(taken), cwd=tmp_path)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert (taken / "keep.txt").read_text() == "mine"
    proc = dstrain("export", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert (
        proc.returncode == 2 and "no such file or directory" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_export_to_an_unwritable_place_is_one_message(trained: Path, tmp_path: Path):
    proc = dstrain(
        "export", str(trained), "--out", "/proc/dstrain-export", cwd=tmp_path
    )  # /proc: even root can't
    assert proc.returncode == 2 and "cannot write there" in proc.stderr and "Traceback" not in proc.stderr

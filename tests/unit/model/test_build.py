"""build.py for the model families beyond Llama: attention `auto`, remote code, and LoRA on MoE models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from dstrain.config.run import LoraConfig, ModelConfig
from dstrain.errors import ConfigError
from dstrain.model import moe
from dstrain.model.build import add_lora, build_model, check_model_path, load_base_model
from dstrain.model.memory import attention_of
from tests.families import write_family
from tests.fixtures.remote_minicpm import write_remote_minicpm

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_family("gemma2", tmp_path_factory.mktemp("gemma2") / "m")


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_remote_minicpm(tmp_path_factory.mktemp("remote") / "minicpm")


def test_gemma2_loads_with_the_default_attention(gemma2: Path):
    """The default `auto` passes nothing: transformers picks eager for Gemma-2 (it refuses sdpa)."""
    model = load_base_model(ModelConfig(path=str(gemma2)))
    assert attention_of(model) == "eager"


def test_llama_keeps_sdpa_by_default():
    assert attention_of(load_base_model(ModelConfig())) == "sdpa"


def test_an_attention_the_model_refuses_is_one_config_error(gemma2: Path):
    with pytest.raises(ConfigError) as err:
        load_base_model(ModelConfig(path=str(gemma2), attn_implementation="sdpa"))
    (problem,) = err.value.problems
    assert problem.startswith("model.attn_implementation: Gemma2ForCausalLM cannot use 'sdpa'")
    assert "use one of: auto, eager, flash_attention_2" in problem


def test_explicit_eager_is_honoured(gemma2: Path):
    model = load_base_model(ModelConfig(path=str(gemma2), attn_implementation="eager"))
    assert attention_of(model) == "eager"


def test_remote_code_without_the_flag_is_found_before_loading(remote: Path):
    (problem,) = check_model_path(ModelConfig(path=str(remote)))
    assert "needs its own modeling code (modeling_minicpm.MiniCPMForCausalLM" in problem
    assert "model.trust_remote_code: true" in problem
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_base_model(ModelConfig(path=str(remote)))


def test_remote_code_with_the_flag_loads_and_warns(remote: Path, capsys: pytest.CaptureFixture):
    cfg = ModelConfig(path=str(remote), trust_remote_code=True)
    assert check_model_path(cfg) == []
    model = load_base_model(cfg)
    assert type(model).__name__ == "MiniCPMForCausalLM"
    warning = capsys.readouterr().err
    assert warning.count("warning: model.trust_remote_code: running modeling code from") == 1
    assert str(remote) in warning and "modeling_minicpm.py" in warning


def test_unknown_model_type_without_code_is_named(tmp_path: Path, remote: Path):
    bare = tmp_path / "bare"
    bare.mkdir()
    text = (remote / "config.json").read_text().replace('"auto_map"', '"not_auto_map"')
    (bare / "config.json").write_text(text)
    (problem,) = check_model_path(ModelConfig(path=str(bare)))
    assert "model_type 'minicpm' is unknown to transformers" in problem


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "deepseek_v2"])
def moe_dir(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_family(request.param, tmp_path_factory.mktemp(request.param) / "m")


def adapted(model: nn.Module) -> set[str]:
    """Names of the modules that carry LoRA weights."""
    return {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def test_all_linear_never_adapts_a_router_or_an_expert(moe_dir: Path, tmp_path: Path):
    """PEFT alone would add the router and the experts here (its transformers-v4 target conversion); the
    adapter saved must also reload onto the same modules (PEFT converts again on load)."""
    model = add_lora(load_base_model(ModelConfig(path=str(moe_dir))), LoraConfig(dropout=0.0))
    names = adapted(model)
    assert any(n.endswith("q_proj") or n.endswith("q_a_proj") for n in names)
    routers = moe.router_modules(model.get_base_model())
    assert routers
    assert not [
        n for n in names if "experts" in n or any(moe.inside(n, "base_model.model." + r) for r in routers)
    ]
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        load_base_model(ModelConfig(path=str(moe_dir))), tmp_path / "adapter"
    )
    assert adapted(reloaded) == names


def test_target_parameters_adapt_the_fused_experts(tmp_path: Path):
    path = write_family("qwen3_moe", tmp_path / "m")
    lora = LoraConfig(dropout=0.0, target_parameters=EXPERTS)
    model = add_lora(load_base_model(ModelConfig(path=str(path))), lora)
    experts = [n for n in adapted(model) if "experts" in n]
    assert len(experts) == 2 * 2  # two layers x (gate_up_proj, down_proj)
    ids = torch.randint(4, 2048, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_linear_routers_and_experts_are_excluded():
    """Older and remote-code MoE blocks keep nn.Linear routers and experts: all-linear leaves them out."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4)
            self.shared_expert_gate = nn.Linear(8, 1)
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(4))
            self.gate_proj = nn.Linear(8, 8)

    block = Block()
    assert moe.router_modules(block) == ["gate", "shared_expert_gate"]
    assert moe.expert_modules(block) == [f"experts.{i}.0" for i in range(4)]
    assert moe.block_classes(nn.Sequential(block)) == [Block]


def test_target_parameters_on_a_dense_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"lora\.target_parameters: .* match no parameter"):
        build_model(ModelConfig(), LoraConfig(dropout=0.0, target_parameters=EXPERTS), zero_stage=2)


def test_flash_attention_without_its_package_is_one_config_error():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError) as err:
        load_base_model(ModelConfig(attn_implementation="flash_attention_2"))
    (problem,) = err.value.problems
    assert problem.startswith("model.attn_implementation: LlamaForCausalLM cannot use 'flash_attention_2'")
    assert "use one of: auto, eager, sdpa" in problem

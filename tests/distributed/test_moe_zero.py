"""MoE models on 2 ranks under ZeRO-3 and ZeRO-2: Qwen3-MoE (4 experts, top-2) with the router's
load-balancing loss in the objective, and DeepSeek-V2 (MLA, a shared expert, no such loss). The ranks
route their tokens differently (recorded from inside the run), nothing hangs (every launch bounded), and
the losses equal one rank with doubled accumulation, also across a save and a resume.

Under ZeRO-3 dstrain registers every sparse MoE block as a leaf module (moe.register_leaf_modules), so a
block's weights are gathered whole whichever experts a rank picks. DeepSpeed 0.19 itself does so only
for the Mixtral, Qwen2-MoE and Qwen3-MoE classes (zero_optimization.leaf_module's defaults, applied at any
stage); DeepSeek-V2's block is not among them, which is why it is here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.families import write_family
from tests.helpers import VENV_BIN, check, make_small_data, metrics, run, torchrun_cmd, write_config

pytestmark = pytest.mark.distributed

STEPS, MIDDLE = 10, 5
REL = 1e-5  # fp32: only the summation order of the gradient average differs
LAUNCH_TIMEOUT_S = 420  # a hang fails the test (helpers.run kills the whole launch)
COEF = 0.05  # large enough that the router term moves the loss visibly

# Written as the ranks' sitecustomize: records, on each rank's first forward, how many tokens each
# router sends to each expert (per layer), to routes.rank<R>.json in DSTRAIN_ROUTE_DIR.
ROUTE_PROBE = """
import os
if os.environ.get("DSTRAIN_ROUTE_DIR") and "RANK" in os.environ:
    import json, dstrain.model.build as build
    from dstrain.model import moe
    original = build.build_model

    def build_model(*args, **kwargs):
        model = original(*args, **kwargs)
        # as dstrain left them, before DeepSpeed applies its own default leaf classes (every stage)
        leaves = sorted({type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)})
        routers = [m for m in model.modules() if isinstance(m, moe.router_classes(model))]
        k = model.get_base_model().config.num_experts_per_tok
        seen = {}

        def record(module, inputs, output, layer):
            if layer in seen or len(seen) == len(routers):
                return
            picked = output[0].float().topk(k, dim=-1).indices.flatten()
            seen[layer] = [int((picked == e).sum()) for e in range(output[0].shape[-1])]
            if len(seen) == len(routers):
                path = os.path.join(os.environ["DSTRAIN_ROUTE_DIR"], f"routes.rank{os.environ['RANK']}.json")
                with open(path, "w") as f:
                    json.dump({"counts": [seen[i] for i in sorted(seen)], "leaves": leaves}, f)

        for i, router in enumerate(routers):
            router.register_forward_hook(lambda m, a, o, i=i: record(m, a, o, i))
        return model

    build.build_model = build_model
"""


ZERO3_LEAF = {"qwen3_moe": ["Qwen3MoeSparseMoeBlock"], "deepseek_v2": ["DeepseekV2Moe"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One copy of the data for every run here."""
    return make_small_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory, data: dict):
    """name -> (model dir, the reference curve: 1 rank, micro 4 x accumulation 2, ZeRO-2), built once."""
    cache: dict[str, tuple[Path, dict[int, dict]]] = {}

    def get(name: str) -> tuple[Path, dict[int, dict]]:
        if name not in cache:
            tmp = tmp_path_factory.mktemp(name)
            model_dir = write_family(name, tmp / "m")
            launch(make_config(tmp, data, model_dir, "one", "zero2"), tmp, nproc=1)
            curve = rows(tmp / "one")
            assert sorted(curve) == list(range(1, STEPS + 1))
            cache[name] = model_dir, curve
        return cache[name]

    return get


def make_config(tmp_path: Path, data: dict, model_dir: Path, name: str, ds: str) -> Path:
    return write_config(
        tmp_path,
        data,
        name,
        model={"path": str(model_dir), "router_aux_loss_coef": COEF},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        ds_config=f"ds_configs/{ds}.json",
        train={
            "max_steps": STEPS,
            "log_every": 1,
            "save_every": MIDDLE,
            "keep_last": 5,
            "global_batch_size": 8,
        },
    )


def launch(config: Path, cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "dstrain.train", "--config", str(config)]
    else:
        cmd = torchrun_cmd("-m", "dstrain.train", "--config", str(config), nproc=nproc)
    return check(run(cmd, cwd, timeout=LAUNCH_TIMEOUT_S))


def rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


def assert_same_curve(got: dict[int, dict], want: dict[int, dict], steps: range) -> None:
    for step in steps:
        assert got[step].keys() >= {"loss"} and ("router_aux_loss" in got[step]) == (
            "router_aux_loss" in want[step]
        )
        for key in ("loss", "router_aux_loss"):
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=REL), (step, key, got[step])


def routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the route probe on the ranks' PYTHONPATH; the launch's environment inherits it."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(ROUTE_PROBE, encoding="utf-8")
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(probe), str(repo), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("DSTRAIN_ROUTE_DIR", str(probe))
    return probe


def assert_ranks_route_differently(probe: Path, leaves: list[str]) -> None:
    """Each rank's first micro batch sends other numbers of tokens to each expert; `leaves`: the classes
    dstrain registered as ZeRO-3 leaf modules on each rank (before DeepSpeed adds its defaults)."""
    records = [json.loads((probe / f"routes.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["leaves"] for r in records] == [leaves, leaves]
    counts = [r["counts"] for r in records]
    assert counts[0] and len(counts[0]) == len(counts[1])  # every MoE layer recorded on both ranks
    assert counts[0] != counts[1], counts  # other tokens, other experts: per-expert work differs by rank
    assert all(sum(layer) > 0 for c in counts for layer in c)


def test_qwen3_moe_zero3_routes_apart_saves_resumes_and_matches_one_rank(
    tmp_path: Path, data: dict, family, monkeypatch: pytest.MonkeyPatch
):
    model_dir, one_rank = family("qwen3_moe")
    assert all(r["router_aux_loss"] > 0 for r in one_rank.values())  # the router term is in and logged
    probe = routes(tmp_path, monkeypatch)
    launch(make_config(tmp_path, data, model_dir, "full", "zero3"), tmp_path, nproc=2)
    assert_ranks_route_differently(probe, ZERO3_LEAF["qwen3_moe"])
    full = tmp_path / "full"
    assert_same_curve(rows(full), one_rank, range(1, STEPS + 1))

    fork = tmp_path / "resumed"  # the run as it was right after the middle checkpoint
    shutil.copytree(full, fork)
    shutil.rmtree(fork / "checkpoints" / f"step-{STEPS:08d}")
    (fork / "checkpoints" / "latest").write_text(f"step-{MIDDLE:08d}\n")
    dstrain_bin = str(VENV_BIN / "dstrain")
    check(run([dstrain_bin, "resume", str(fork), "--num-gpus", "2"], tmp_path, LAUNCH_TIMEOUT_S))
    assert_same_curve(rows(fork), one_rank, range(MIDDLE + 1, STEPS + 1))


def test_qwen3_moe_zero2_matches_one_rank(
    tmp_path: Path, data: dict, family, monkeypatch: pytest.MonkeyPatch
):
    model_dir, one_rank = family("qwen3_moe")
    probe = routes(tmp_path, monkeypatch)
    launch(make_config(tmp_path, data, model_dir, "two", "zero2"), tmp_path, nproc=2)
    assert_ranks_route_differently(probe, [])
    assert_same_curve(rows(tmp_path / "two"), one_rank, range(1, STEPS + 1))


def test_deepseek_v2_zero3_matches_one_rank(
    tmp_path: Path, data: dict, family, monkeypatch: pytest.MonkeyPatch
):
    """A block DeepSpeed does not know as a leaf (DeepseekV2Moe): registered by dstrain, no hang."""
    model_dir, one_rank = family("deepseek_v2")
    probe = routes(tmp_path, monkeypatch)
    launch(make_config(tmp_path, data, model_dir, "two", "zero3"), tmp_path, nproc=2)
    assert_ranks_route_differently(probe, ZERO3_LEAF["deepseek_v2"])
    assert_same_curve(rows(tmp_path / "two"), one_rank, range(1, STEPS + 1))

"""What the loop works with: `Run`, the parts built once (immutable), and `Tally`, the counts that change.

The trainer state that a checkpoint carries (step, tokens, best metric, ...) is `checkpoint.state.TrainerState`;
`Tally` holds what only this process needs to know while it trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from peft import PeftModel

    from dstrain.checkpoint.save import RunFiles
    from dstrain.config.run import DataConfig, ObjectiveConfig, TrainConfig
    from dstrain.config.zero import BatchPlan
    from dstrain.data.batches import Example, MicroBatch
    from dstrain.data.kto import KtoExample
    from dstrain.data.pairs import PairExample
    from dstrain.data.records import BadRecord
    from dstrain.distributed.stop import StopRequest
    from dstrain.eval.generation import GenerationEval
    from dstrain.metrics.sinks import MetricsSink


@dataclass(frozen=True)
class Run:
    """The wiring of one training run, built by `training.setup.start`."""

    train: TrainConfig
    data: DataConfig
    objective: ObjectiveConfig
    ds: dict[str, Any]  # the resolved ZeRO JSON
    plan: BatchPlan
    engine: DeepSpeedEngine  # an opaque handle: only dstrain.engine calls it
    peft_model: PeftModel
    batches: Iterator[MicroBatch]
    eval_examples: list[Example] | list[PairExample] | list[KtoExample]
    steps_per_epoch: int
    total_steps: int
    output_dir: Path
    run_files: RunFiles
    pad_id: int
    rank: int
    sink: MetricsSink
    stop: StopRequest
    num_params: int  # all parameters (base + adapter), for the MFU estimate
    generation: GenerationEval | None = None  # train.eval_generate > 0
    reference_table: torch.Tensor | None = None  # objective.precompute_reference: [records, 2] log-probs
    # what the first-batch self-check and the router loss need to know of the model (training/setup.wire)
    model_name: str = ""
    param_dtype: torch.dtype | None = None
    head_exact: bool = False  # the run's log-probs come from the model's own forward: nothing to check
    moe: bool = False  # the objective carries the router's load-balancing loss


@dataclass
class Tally:
    """Counts the loop updates as it goes; what a resume needs of them is in the trainer state (bad_records)."""

    index_bad: int = 0  # records the index found bad: never drawn, recounted by the index on resume
    records_seen: int = 0  # distinct training records, good and bad: the base of data.max_bad_fraction
    # corpus indices of records bad at tokenisation (training/bad_records.py): all ranks' since the run began,
    # merged at logged steps (the state's bad_records), and those this process met (each named once)
    known_bad: set[int] = field(default_factory=set)
    met_bad: set[int] = field(default_factory=set)
    failed_records: list[BadRecord] = field(default_factory=list)  # this step's, under data.on_error=fail
    nonfinite_in_a_row: int = 0
    cleaned_records: int = 0  # training records data.clean changed (Unicode NFC, control characters, ...)
    head_checked: bool = False  # the first-batch self-check ran (model/selfcheck.py)
    step_lrs: list[float] = field(default_factory=list)  # each param group's LR in the last step's update

    @property
    def skipped_records(self) -> int:
        """Distinct bad training records skipped so far (index + tokenisation), each once whatever the epochs."""
        return self.index_bad + len(self.known_bad)

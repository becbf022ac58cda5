"""Baseline side of bench/sft_bench.py and bench/dpo_bench.py: one rank of an HF Trainer / TRL run.

Launched by the benchmarks as `deepspeed --num_gpus N bench/hf_worker.py --mode MODE --workload W.json ...`:

  sft-hf    transformers.Trainer, LoRA via PEFT, rows tokenised by dstrain's own `tokenize_rag` (identical
            input_ids; labels -100 on the prompt, as HF users mask it), right-padded per batch; the model's
            own `labels=` loss. Option {"group_by_length": true}: train_sampling_strategy="group_by_length";
            {"use_liger_kernel": true}: Liger's kernels and fused linear cross-entropy (CUDA only).
  sft-trl   trl.SFTTrainer on a prompt/completion dataset (prompt rendered by dstrain's template with the
            same passage cut), completion-only loss, LoRA peft_config, no packing.
  dpo-trl   trl.DPOTrainer on prompt/chosen/rejected, ref_model=None (the reference is the policy with its
            adapter disabled), LoRA peft_config, beta and max_length from the workload.

All three take the workload's fully resolved ZeRO JSON as `TrainingArguments(deepspeed=dict)`, with arguments
set to the JSON's values (HF raises on any mismatch). Timing: a training_step hook counts each batch's
attention-mask ones (tokens) and rows (pairs for DPO: rows / 2) once `warmup` optimizer steps are done; a
callback starts the clock at the end of step `warmup` and stops it at the end of the last step (device
synchronised). Every framework logs on the same steps (bench_workload.log_every), and the time of those logs
is left out of the clock here, as dstrain's meter leaves out its own. Rank 0 writes {seconds, tokens, pairs,
steps, peak_mem_gb, loss} summed over ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_workload as bw


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """Shared between the step hook and the callback: what was trained after warm-up, and when."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.step = 0  # optimizer steps completed
        self.tokens: Any = 0  # a device tensor once counting starts
        self.rows = 0
        self.started: float | None = None
        self.ended: float | None = None
        self.excluded = 0.0  # seconds spent logging inside the timed window
        self.last_loss: float | None = None
        self.first_step_s: float | None = None  # from this process's start to the end of optimizer step 1


def make_callback(clock: Clock) -> Any:
    from transformers import TrainerCallback

    class TimingCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step = state.global_step
            if clock.first_step_s is None:  # as dstrain's startup_total_s: process start to the first step
                import psutil

                clock.first_step_s = time.time() - psutil.Process().create_time()
            if state.global_step == clock.warmup:
                synchronize()
                clock.started = time.perf_counter()
            if state.global_step == state.max_steps:
                synchronize()
                clock.ended = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.last_loss = float(logs["loss"])

    return TimingCallback()


def batch_size(inputs: dict) -> tuple[Any, int]:
    """(real tokens, rows) of one batch: one sequence per row (SFT, TRL's DPOTrainer), or ORPOTrainer's
    `chosen_*`/`rejected_*` pair (prompt + answer each, 2 rows per pair). Tokens stay a device tensor: summed
    there, no host sync added to the baseline's step."""
    if "input_ids" in inputs:
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else inputs["input_ids"].numel()
        return tokens, int(inputs["input_ids"].shape[0])
    sides = ("chosen", "rejected")
    tokens = sum(inputs[f"{side}_attention_mask"].sum() for side in sides)
    return tokens, sum(int(inputs[f"{side}_input_ids"].shape[0]) for side in sides)


def counting(trainer_cls: type, clock: Clock) -> type:
    """`trainer_cls` whose training_step counts the batch's real tokens and rows after warm-up."""

    class Counting(trainer_cls):  # type: ignore[misc, valid-type]
        def training_step(self, model, inputs, *args, **kwargs):
            if clock.step >= clock.warmup:
                tokens, rows = batch_size(inputs)
                clock.tokens = clock.tokens + tokens
                clock.rows += rows
            return super().training_step(model, inputs, *args, **kwargs)

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            # HF logs right after on_step_end; dstrain's clock leaves its logging out, so this one does too
            timing = self.control.should_log and clock.started is not None and clock.ended is None
            if not timing:
                return super()._maybe_log_save_evaluate(*args, **kwargs)
            synchronize()
            began = time.perf_counter()
            result = super()._maybe_log_save_evaluate(*args, **kwargs)
            synchronize()
            clock.excluded += time.perf_counter() - began
            return result

    return Counting


def common_args(work: bw.Workload, out: str, ds: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments fields that must equal the ZeRO JSON's explicit values (HF checks each)."""
    opt = ds["optimizer"]["params"]
    return {
        "output_dir": out,
        "per_device_train_batch_size": ds["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds["gradient_accumulation_steps"],
        "max_steps": work.steps,
        "learning_rate": opt["lr"],
        "adam_beta1": opt["betas"][0],
        "adam_beta2": opt["betas"][1],
        "adam_epsilon": opt["eps"],
        "weight_decay": opt["weight_decay"],
        "max_grad_norm": ds["gradient_clipping"],
        "warmup_steps": ds["scheduler"]["params"]["warmup_num_steps"],
        "bf16": bool(ds.get("bf16", {}).get("enabled")),
        "fp16": False,
        "deepspeed": ds,
        "logging_steps": bw.log_every(work),
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "dataloader_num_workers": 0,
        "seed": 42,
        "disable_tqdm": True,
        "gradient_checkpointing": work.gradient_checkpointing,
        "use_cpu": not _cuda(),
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_model(work: bw.Workload) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[work.dtype]
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if work.load_in_4bit:  # QLoRA as the PEFT/TRL docs show it (no device_map under DeepSpeed)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
        if (
            torch.cuda.is_available()
        ):  # quantise straight onto this rank's GPU, as single-GPU QLoRA recipes do
            import os

            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(work.model, **kwargs)
    model.config.use_cache = False
    return model


def lora_config(work: bw.Workload) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=work.lora_r,
        lora_alpha=work.lora_alpha,
        lora_dropout=work.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def records(work: bw.Workload) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(work.data).read_text(encoding="utf-8").splitlines() if line]


def sft_hf(work: bw.Workload, options: dict[str, Any], out: str, clock: Clock) -> Any:
    """transformers.Trainer: the model's `labels=` loss over full logits, what HF users run."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from dstrain.config.run import DataConfig
    from dstrain.data.batches import tokenize_rag
    from dstrain.data.records import parse_record

    tokenizer = bw.load_tokenizer()
    cfg = DataConfig(
        format="sft-rag", max_seq_len=work.max_seq_len, max_passage_tokens=work.max_passage_tokens
    )
    rows = []
    for record in records(work):
        example = tokenize_rag(tokenizer, parse_record(record, "sft-rag"), cfg)
        rows.append(
            {"input_ids": example.input_ids, "labels": example.labels, "length": len(example.input_ids)}
        )
    dataset = Dataset.from_list(rows)
    pad = tokenizer.pad_token_id

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    ds = json.loads(Path(work.ds_config).read_text())
    extra: dict[str, Any] = {"use_liger_kernel": bool(options.get("use_liger_kernel", False))}
    if options.get("group_by_length"):
        extra.update(train_sampling_strategy="group_by_length", length_column_name="length")
    args = TrainingArguments(**common_args(work, out, ds), remove_unused_columns=False, **extra)
    model = get_peft_model(load_model(work), lora_config(work))
    trainer_cls = counting(Trainer, clock)
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        processing_class=tokenizer,
        callbacks=[make_callback(clock)],
    )


def sft_trl(work: bw.Workload, options: dict[str, Any], out: str, clock: Clock) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = bw.load_tokenizer()
    rows = [
        {
            "prompt": bw.rendered_prompt(tokenizer, r, work.max_passage_tokens),
            "completion": " " + r["answer"].strip(),  # TRL appends EOS, as dstrain does
        }
        for r in records(work)
    ]
    ds = json.loads(Path(work.ds_config).read_text())
    args = SFTConfig(
        **common_args(work, out, ds),
        max_length=work.max_seq_len,
        packing=bool(options.get("packing", False)),
        completion_only_loss=True,
        dataset_num_proc=None,
        **({"train_sampling_strategy": "group_by_length"} if options.get("group_by_length") else {}),
    )
    trainer_cls = counting(SFTTrainer, clock)
    return trainer_cls(
        model=load_model(work),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(work),
        callbacks=[make_callback(clock)],
    )


def preference_rows(work: bw.Workload, tokenizer: Any) -> list[dict[str, str]]:
    """prompt/chosen/rejected rows, the prompt rendered by dstrain's template (the same text dstrain trains on)."""

    def answer(value: Any) -> str:
        return " " + (value["text"] if isinstance(value, dict) else value).strip()

    return [
        {
            "prompt": bw.rendered_prompt(tokenizer, r, work.max_passage_tokens),
            "chosen": answer(r.get("chosen", r.get("answer"))),
            "rejected": answer(r["rejected"]),
        }
        for r in records(work)
    ]


def dpo_trl(work: bw.Workload, options: dict[str, Any], out: str, clock: Clock) -> Any:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = bw.load_tokenizer()
    ds = json.loads(Path(work.ds_config).read_text())
    args = DPOConfig(
        **common_args(work, out, ds),
        beta=work.beta,
        max_length=work.max_seq_len,
        precompute_ref_log_probs=bool(options.get("precompute_ref_log_probs", False)),
        dataset_num_proc=None,
    )
    trainer_cls = counting(DPOTrainer, clock)
    return trainer_cls(
        model=load_model(work),
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(preference_rows(work, tokenizer)),
        processing_class=tokenizer,
        peft_config=lora_config(work),
        callbacks=[make_callback(clock)],
    )


def orpo_trl(work: bw.Workload, options: dict[str, Any], out: str, clock: Clock) -> Any:
    """TRL's ORPOTrainer (trl.experimental.orpo in TRL 1.x): no reference model; beta is ORPO's lambda."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = bw.load_tokenizer()
    ds = json.loads(Path(work.ds_config).read_text())
    args = ORPOConfig(
        **common_args(work, out, ds), beta=work.beta, max_length=work.max_seq_len, dataset_num_proc=None
    )
    trainer_cls = counting(ORPOTrainer, clock)
    return trainer_cls(
        model=load_model(work),
        args=args,
        train_dataset=Dataset.from_list(preference_rows(work, tokenizer)),
        processing_class=tokenizer,
        peft_config=lora_config(work),
        callbacks=[make_callback(clock)],
    )


MODES = {"sft-hf": sft_hf, "sft-trl": sft_trl, "dpo-trl": dpo_trl, "orpo-trl": orpo_trl}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--workload", required=True, help="JSON written by bench_common.Workload.save")
    parser.add_argument("--options", default="{}", help="JSON object of mode options")
    parser.add_argument("--result", required=True, help="where rank 0 writes the measurement (JSON)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch
    import torch.distributed as dist

    work = bw.Workload.load(args.workload)
    clock = Clock(work.warmup)
    trainer = MODES[args.mode](work, json.loads(args.options), args.output_dir, clock)
    trainer.train()  # peak memory since process start, as dstrain's mem_gb reports it
    if clock.started is None or clock.ended is None:
        raise SystemExit(
            f"timing incomplete: started {clock.started}, ended {clock.ended}, step {clock.step}"
        )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    tokens = clock.tokens.item() if isinstance(clock.tokens, torch.Tensor) else clock.tokens
    totals = torch.tensor([tokens, clock.rows, peak], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        summed = totals.clone()
        dist.all_reduce(summed)
        peak_t = totals[2:].clone()
        dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
        totals = torch.cat([summed[:2], peak_t])
        rank = dist.get_rank()
    else:
        rank = 0
    if rank == 0:
        tokens, rows, peak = totals.tolist()
        pairs = int(rows) // 2 if args.mode.startswith(("dpo", "orpo")) else 0
        result = {
            "seconds": clock.ended - clock.started - clock.excluded,
            "tokens": int(tokens),
            "pairs": pairs,
            "steps": work.steps - work.warmup,
            "peak_mem_gb": peak or None,
            "loss": clock.last_loss,
            "first_step_s": clock.first_step_s,
        }
        Path(args.result).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()

"""dstrain: LoRA/QLoRA fine-tuning for retrieval-augmented generation inside DeepSpeed ZeRO."""

__version__ = "0.1.0"

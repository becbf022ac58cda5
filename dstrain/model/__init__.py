"""The model: base causal LM, tokenizer and LoRA (`build`), 4-bit QLoRA (`quant`), the supervised-only chunked
output head (`head`), each layer kind's attention mask (`windows`), the module DeepSpeed wraps (`supervised`), and
the per-rank memory estimate (`memory`).

No distributed code: everything here is plain PyTorch, testable without a process group.
"""

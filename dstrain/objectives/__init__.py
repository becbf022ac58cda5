"""Training objectives as pure functions: SFT, DPO (+ label smoothing), IPO, SimPO and DPO+NLL losses
(`losses`), and the per-pair terms of a preference batch (`preference`). Tensors in, tensors out."""

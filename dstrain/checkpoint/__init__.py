"""Crash-safe checkpoints: names, manifest and `latest` (`layout`), atomic writes (`atomic`), saving from a
running engine (`save`) and reading back (`load`), world-size independent optimizer state (`optim`), RNG state
(`rng`), the trainer state (`state`); and the commands built on them: `resume`, `export`, `report` (inspect)."""

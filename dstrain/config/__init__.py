"""Configuration: the typed, strict run config (`run`) and its semantic checks (`checks`), its dataclass parser (`parse`), the ZeRO JSON resolved
and validated against it and the world size (`zero`), and the embedded demo's config (`demo`).

Everything here runs before any process group exists, so a bad config fails on every rank at once.
"""

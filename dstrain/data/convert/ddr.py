"""UltraRAG DDR: the scored output (`ddr` -> preference or kto) and the first stage (`ddr-sft` -> sft-rag).

Scored output: `context` lists the sampled answers, each {"text", "temperature", "type", "<metric>_score"}
(the metric's name varies: rouge_score, ...), and `chosen`/`rejected` are the entries of max/min score.
Mapping decisions:
- ties are dropped and counted: chosen and rejected with the same text (white space normalised) or the same
  score are no preference (DPO's gradient on such a pair is zero);
- `--pick-by FIELD` re-picks chosen (max) and rejected (min) from `context` by FIELD; entries without a
  numeric FIELD or without text are left out of the pick;
- `--min-margin X` drops pairs whose score margin (chosen - rejected) is below X, measured by `--pick-by`'s
  field, else by the one `*_score` field the pair carries;
- a pair whose chosen scores below its rejected is dropped (the file's order is not trusted).
To kto (unpaired feedback), every scored `context` entry becomes one record: its answer is desirable
(label true) when its score is >= `--threshold` (default 0.5, DDR's scores lie in [0, 1]), undesirable
(false) below it. The score is `--pick-by`'s field, else the one `*_score` field the entries carry; entries
without text or a numeric score are left out, and an answer sampled twice (same text, white space
normalised) is kept once. A sample with no scored entry is dropped.
First stage: `query`, `retrieval_result`, `ground_truth` -> sft-rag with the ground truth as the answer.
"""

from __future__ import annotations

from typing import Any

from dstrain.data.convert.registry import Drop, Options, register, strings, text
from dstrain.data.records import same_text


def _is_scored(obj: dict) -> bool:
    return isinstance(obj.get("context"), list) and "chosen" in obj and "rejected" in obj


def _is_first_stage(obj: dict) -> bool:
    keys = {"query", "retrieval_result", "ground_truth"}
    return keys <= obj.keys() and not isinstance(obj["query"], dict) and not _is_scored(obj)


DEFAULT_THRESHOLD = 0.5  # kto: a sampled answer scoring at least this is desirable


@register("ddr", targets=("preference", "kto"), detect=_is_scored)
def ddr(obj: dict, to: str, opts: Options) -> dict | list[dict]:
    """UltraRAG DDR scored output: sampled answers in `context`, chosen/rejected = max/min score."""
    query, passages = text(obj, "query"), strings(obj, "retrieval_result")
    if to == "kto":
        return _kto(obj, query, passages, opts)
    if opts.pick_by:
        chosen, rejected = _pick(obj, opts.pick_by)
        metric: str | None = opts.pick_by
    else:
        chosen, rejected = _entry(obj, "chosen"), _entry(obj, "rejected")
        metric = _metric(chosen, rejected)
    good, bad = text(chosen, "text", "chosen."), text(rejected, "text", "rejected.")
    if same_text(good, bad):
        raise Drop("tie: chosen equals rejected")
    _check_margin(chosen, rejected, metric, opts.min_margin)
    return {"query": query, "retrieval_result": passages, "chosen": {"text": good}, "rejected": {"text": bad}}


def _kto(obj: dict, query: str, passages: list[str], opts: Options) -> list[dict]:
    """One kto record per scored `context` entry: desirable at or above the threshold, undesirable below."""
    entries = [e for e in obj["context"] if isinstance(e, dict) and isinstance(e.get("text"), str)]
    entries = [e for e in entries if e["text"].strip()]
    metric = opts.pick_by or _context_metric(entries)
    threshold = DEFAULT_THRESHOLD if opts.threshold is None else opts.threshold
    out: list[dict] = []
    for entry in entries:
        score = _score(entry, metric)
        if score is None or any(same_text(entry["text"], kept["answer"]) for kept in out):
            continue
        label = score >= threshold
        out.append({"query": query, "retrieval_result": passages, "answer": entry["text"], "label": label})
    if not out:
        raise Drop(f"no context entry with text and a numeric '{metric}'")
    return out


def _context_metric(entries: list[dict]) -> str:
    """The one `*_score` field the context entries carry."""
    names = sorted({k for e in entries for k in e if k.endswith("_score") and _score(e, k) is not None})
    if len(names) != 1:
        found = f"several scores ({', '.join(names)})" if names else "no *_score field in context"
        raise Drop(f"{found}: name the score with --pick-by")
    return names[0]


def _entry(obj: dict, key: str) -> dict:
    value = obj.get(key)
    if isinstance(value, str):
        return {"text": value}
    if not isinstance(value, dict):
        kind = "nothing" if value is None else type(value).__name__
        raise Drop(f"field '{key}' must be a context entry {{\"text\", ...}}, got {kind}")
    return value


def _score(entry: Any, field: str) -> float | None:
    value = entry.get(field) if isinstance(entry, dict) else None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value  # NaN is no score
    return float(value) if ok else None


def _metric(chosen: dict, rejected: dict) -> str | None:
    """The `*_score` field both answers carry (None if there is none)."""
    shared = sorted(k for k in chosen if k.endswith("_score") and _score(rejected, k) is not None)
    shared = [k for k in shared if _score(chosen, k) is not None]
    if len(shared) > 1:
        raise Drop(f"several scores ({', '.join(shared)}): choose one with --pick-by")
    return shared[0] if shared else None


def _pick(obj: dict, field: str) -> tuple[dict, dict]:
    scored = [e for e in obj["context"] if _score(e, field) is not None and isinstance(e.get("text"), str)]
    scored = [e for e in scored if e["text"].strip()]
    if len(scored) < 2:
        raise Drop(f"fewer than 2 context entries scored by '{field}'")
    return max(scored, key=lambda e: _score(e, field)), min(scored, key=lambda e: _score(e, field))


def _check_margin(chosen: dict, rejected: dict, metric: str | None, min_margin: float | None) -> None:
    if metric is None:
        if min_margin is not None:
            raise Drop("no score to measure --min-margin by (name one with --pick-by)")
        return
    margin = _score(chosen, metric) - _score(rejected, metric)
    if margin == 0:
        raise Drop(f"tie: chosen and rejected have the same {metric}")
    if margin < 0:
        raise Drop(f"chosen scores below rejected by {metric}")
    if min_margin is not None and margin < min_margin:
        raise Drop(f"{metric} margin below --min-margin")


@register("ddr-sft", targets=("sft-rag",), detect=_is_first_stage)
def ddr_sft(obj: dict, to: str, opts: Options) -> dict:
    """UltraRAG DDR first stage (or scored output): the ground truth as the SFT answer."""
    answer = obj.get("ground_truth")
    if isinstance(answer, list):  # some stages keep several reference answers: the first is the gold one
        answer = next((a for a in answer if isinstance(a, str) and a.strip()), None)
    answer = text({"ground_truth": answer}, "ground_truth")
    return {
        "query": text(obj, "query"),
        "retrieval_result": strings(obj, "retrieval_result"),
        "answer": answer,
    }

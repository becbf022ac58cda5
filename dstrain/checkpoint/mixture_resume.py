"""Resuming a mixture: where its plan continues, and which changes of its sources a resume accepts.

Without `--set data.train=...` the checkpoint's snapshot names the same sources and weights, and the plan
continues from the one the checkpoint recorded (`TrainerState.mixture_origin`): the same batches as an
uninterrupted run, on any world size. With it, a resume may change the weights or `epochs` limits, add
sources or drop them: a new plan starts at the resumed step from the records each source had given, so every
source continues its own order where it stopped (a new one from its first record), and from that step each
global batch follows the new weights. What a source reads (its files, format, max_samples) defines its
order and cannot change under the same name: that is refused, as is turning a plain list into a mixture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dstrain.config.sources import Source, is_mixture, sources_of
from dstrain.data.mixture import Origin
from dstrain.errors import DataError

if TYPE_CHECKING:
    from dstrain.checkpoint.resume import ResumePoint
    from dstrain.checkpoint.state import TrainerState
    from dstrain.config.run import RunConfig
    from dstrain.data.sources import Mixture
    from dstrain.training.prepare import Prepared

OWN_ORDER = ("format", "max_samples")  # a source's records and their order: fixed under its name
NEW_RUN = "start a new run with `dstrain train` (or give the changed source a new name)"


def resume_origin(cfg: RunConfig, resume: ResumePoint) -> Origin | None:
    """Where a resumed mixture's plan continues (None: a plain list); what a changed data.train does to the
    order is added to the notes said at start-up."""
    origin, notes = plan_origin(resume.state, cfg)
    resume.notes.extend(notes)
    return origin


def check_resumed_data(resume: ResumePoint, prepared: Prepared) -> None:
    """The data a resumed run reads must be the data its checkpoint's position points into."""
    from dstrain.checkpoint.resume import check_same_data
    from dstrain.config.sources import train_patterns
    from dstrain.data.provenance import describe_files

    if prepared.mixture is not None:
        check_same_sources(resume.state, prepared.mixture, prepared.mixture.describe_files())
    else:
        check_same_data(resume.state, len(prepared.train), describe_files(train_patterns(prepared.cfg.data)))


def plan_origin(state: TrainerState, cfg: RunConfig) -> tuple[Origin | None, list[str]]:
    """Where a resumed mixture's plan starts, and a note of what a changed data.train does to the order."""
    mixed = is_mixture(cfg.data.train)
    if not state.sources and not mixed:
        return None, []
    if bool(state.sources) != mixed:
        was, now = ("a mixture", "a plain list of paths") if state.sources else ("a plain list", "a mixture")
        raise DataError(
            f"data.train was {was} when the checkpoint was written and is {now} now: the saved data position "
            f"means nothing in the new layout; {NEW_RUN}"
        )
    now = sources_of(cfg.data)
    saved = {entry["name"]: entry for entry in state.sources}
    changed = [
        f"{s.name}: {key} {saved[s.name].get(key)} -> {getattr(s, key)}"
        for s in now
        if s.name in saved
        for key in OWN_ORDER
        if saved[s.name].get(key) != getattr(s, key)
    ]
    if changed:
        raise DataError(
            f"data.train: {'; '.join(changed)} since the checkpoint: the source's saved position would point "
            f"at other records; {NEW_RUN}"
        )
    if [(e["name"], e["weight"], e["epochs"]) for e in state.sources] == [
        (s.name, s.weight, s.epochs) for s in now
    ]:
        kept = state.mixture_origin
        drawn = kept.get("drawn") or {}
        return Origin(
            int(kept.get("step", 0)), tuple(int(drawn.get(s.name, 0)) for s in now) if drawn else ()
        ), []
    drawn = tuple(int(saved[s.name]["samples"]) if s.name in saved else 0 for s in now)
    return Origin(state.step, drawn), [change_note(state, now)]


def change_note(state: TrainerState, now: list[Source]) -> str:
    """What a resume with other sources or weights does to the data order, said at start-up."""
    saved = {entry["name"]: entry for entry in state.sources}
    names = {s.name for s in now}
    parts = []
    for s in now:
        old = saved.get(s.name)
        if old is None:
            parts.append(f"{s.name} added (weight {s.weight:g}, from its first record)")
            continue
        if old["weight"] != s.weight:
            parts.append(f"{s.name} weight {old['weight']:g} -> {s.weight:g}")
        if old["epochs"] != s.epochs:
            parts.append(f"{s.name} epochs {old['epochs'] or 'unlimited'} -> {s.epochs or 'unlimited'}")
    parts += [f"{name} dropped" for name in saved if name not in names]
    kept = [
        f"{s.name} at record {saved[s.name]['cursor']:,} of its epoch {saved[s.name]['epoch']}"
        for s in now
        if s.name in saved
    ]
    return (
        f"data.train changed on resume ({'; '.join(parts)}): from step {state.step} on each global batch "
        f"follows the new weights, and each source continues its own order where it stopped "
        f"({', '.join(kept) or 'none kept'}); the batches differ from an uninterrupted run of the old mixture"
    )


def check_same_sources(state: TrainerState, mixture: Mixture, files: list[list[dict[str, Any]]]) -> None:
    """A source kept under its name must read the same records: the same count and unchanged files."""
    from dstrain.data.provenance import changed_files

    saved = {entry["name"]: entry for entry in state.sources}
    problems = []
    for source, span, now in zip(mixture.sources, mixture.spans, files, strict=True):
        old = saved.get(source.name)
        if old is None:
            continue
        lines = changed_files(old.get("files") or [], now)
        if old.get("records") != span.records:
            lines.insert(0, f"{old.get('records')} usable records when saved, {span.records} now")
        problems += [f"source {source.name}: {line}" for line in lines]
    if problems:
        raise DataError(
            "data.train changed since the checkpoint: "
            + "; ".join(problems)
            + ": a source's saved position would point at other records. Restore the original files, or "
            + NEW_RUN
        )

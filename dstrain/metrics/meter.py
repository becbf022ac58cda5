"""Step metrics: accumulated on device without host syncs, reduced across ranks only when logged."""

from __future__ import annotations

import time

import numpy as np
import torch

from dstrain.distributed.collectives import all_reduce_sum


class StepMeter:
    """Sums per-micro-batch loss and token counts as tensors; `.collect()` is the one host sync per log.

    `per_step` (objective.loss_normalization=global): each micro batch adds its share of the step's loss
    (objectives/normalize.py), so a step's loss is the sum over its micro batches and ranks, and the logged
    loss is the mean over the logged steps whose loss was finite (`end_step`). Otherwise each micro batch
    adds its own mean and the logged loss is the mean over micro batches with a finite loss.

    A mixture of `sources` sources (training/sources.py) also sums, per source, the loss over its units
    (device tensors, a step at a time so a non-finite step leaves them), its units and its tokens; they
    join the one all-reduce of `collect`.
    """

    def __init__(self, per_step: bool = False, sources: int = 0) -> None:
        self.per_step = per_step
        self.sources = sources
        self.reset()

    def reset(self) -> None:
        self.step_sum: torch.Tensor | None = None  # per_step: this step's shares, until end_step
        self.finite_steps = 0  # per_step: logged steps whose loss was finite on every rank
        self.loss_sum: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None  # micro batches of the current step with a NaN/inf loss
        self.finite: torch.Tensor | None = None  # micro batches since the last log with a finite loss
        self.micro_batches = 0
        self.tokens = 0
        self.samples = 0
        self.skipped = 0  # records dropped at tokenisation under data.on_error=skip
        self.pairs: torch.Tensor | None = None  # preference objectives: [chosen, rejected, margin, right, n]
        # objective terms logged as sum / count (orpo's nll_loss, log_odds; kto's rewards by label, kl)
        self.means: dict[str, torch.Tensor] = {}
        self.router: torch.Tensor | None = None  # MoE: summed weighted router loss of the micro batches
        self.data_wait_s = 0.0
        self.excluded_s = 0.0
        self.started = time.perf_counter()
        # a mixture: this step's per-source loss sums (device) and units, and the window's finite steps' sums
        self.source_step: torch.Tensor | None = None
        self.source_step_units = np.zeros(self.sources)
        self.source_loss: torch.Tensor | None = None
        self.source_units = np.zeros(self.sources)
        self.source_tokens = np.zeros(self.sources)

    def exclude(self, seconds: float) -> None:
        """Time spent outside training steps (eval, save) that throughput must not count."""
        self.excluded_s += seconds

    def add(
        self, loss: torch.Tensor, tokens: int, samples: int, data_wait_s: float, skipped: int = 0
    ) -> None:
        """One micro batch: its loss (a device tensor, not synced here), real tokens, good and bad samples."""
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        bad = (~finite).float()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        self.finite = (1.0 - bad) if self.finite is None else self.finite + (1.0 - bad)
        loss = torch.where(finite, loss, torch.zeros_like(loss))  # a skipped step must not poison the mean
        if self.per_step:
            self.step_sum = loss if self.step_sum is None else self.step_sum + loss
        else:
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.tokens += tokens
        self.micro_batches += 1
        self.samples += samples
        self.skipped += skipped
        self.data_wait_s += data_wait_s

    def add_sources(self, losses: torch.Tensor | None, units: list[int], tokens: list[int]) -> None:
        """One micro batch of a mixture: each source's summed loss over its units (a device tensor [S], not
        synced here; None when this rank holds no share of it), and its units and tokens (host counts)."""
        if losses is not None:
            losses = losses.detach().double()
            self.source_step = losses if self.source_step is None else self.source_step + losses
        self.source_step_units += units
        self.source_tokens += tokens

    def wait(self, seconds: float) -> None:
        """Time spent waiting for a step's micro batches."""
        self.data_wait_s += seconds

    def end_step(self, nonfinite: bool) -> None:
        """The step is done and every rank knows whether its loss was finite anywhere (per_step: a skipped
        step's shares leave the logged mean, as a non-finite micro batch does without per_step)."""
        if self.sources:
            if not nonfinite and self.source_step is not None:
                loss = self.source_step
                self.source_loss = loss if self.source_loss is None else self.source_loss + loss
            if not nonfinite:
                self.source_units += self.source_step_units
            self.source_step, self.source_step_units = None, np.zeros(self.sources)
        if not self.per_step or self.step_sum is None:
            return
        if not nonfinite:
            self.loss_sum = self.step_sum if self.loss_sum is None else self.loss_sum + self.step_sum
            self.finite_steps += 1
        self.step_sum = None

    def add_pairs(
        self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Sums of one micro batch's pair rewards over its real pairs (device tensors, not synced here)."""
        right = (margin > 0).float()
        stats = torch.stack([(v.detach().float() * valid).sum() for v in (chosen, rejected, margin, right)])
        stats = torch.cat([stats, valid.sum()[None]])
        self.pairs = stats if self.pairs is None else self.pairs + stats

    def add_means(self, terms: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Named (sum, count) pairs of one micro batch (device tensors, not synced here): each is logged as
        its sum over the micro batches and ranks since the last log, over its count."""
        for name, (total, count) in terms.items():
            pair = torch.stack([total.detach().double(), count.detach().to(total.device, torch.float64)])
            self.means[name] = pair if name not in self.means else self.means[name] + pair

    def add_router(self, loss: torch.Tensor) -> None:
        """One micro batch's weighted router load-balancing loss (MoE; a device tensor, not synced here)."""
        loss = loss.detach().float().reshape(1)
        self.router = loss if self.router is None else self.router + loss

    def take_nonfinite(self) -> torch.Tensor:
        """This step's count of non-finite micro-batch losses (a device tensor), reset for the next step."""
        value = self.nonfinite if self.nonfinite is not None else torch.zeros(())
        self.nonfinite = None
        return value

    def collect(self, steps: int) -> dict[str, float]:
        """Reduce over ranks: loss is the mean micro-batch loss, tokens/samples are global sums."""
        if self.loss_sum is None:  # per_step, and no logged step had a finite loss
            self.loss_sum = torch.zeros(())
        device = self.loss_sum.device
        counts = [self.tokens, self.micro_batches, self.samples, self.data_wait_s, self.skipped]
        local = torch.cat(
            [
                torch.stack([self.loss_sum.double(), self.finite.to(device, torch.float64)]),
                torch.tensor(counts, dtype=torch.float64, device=device),  # exact beyond 2**24 tokens
            ]
        )
        # the same objective and model on every rank: the same vector length
        extra = [t.to(device, torch.float64) for t in (self.pairs, self.router) if t is not None]
        names = sorted(self.means)
        extra += [self.means[name].to(device) for name in names]
        mixed = self.source_sums(device)
        reduced = all_reduce_sum(torch.cat([local, *extra, mixed])).tolist()
        # a mixture's [loss, units, tokens] per source, for training/sources.py to turn into the row's keys
        by_source = {"sources_now": reduced[len(reduced) - len(mixed) :]} if self.sources else {}
        reduced = reduced[: len(reduced) - len(mixed)]
        loss_sum, finite, tokens, micro, samples, wait, skipped = reduced[:7]
        pairs = reduced[7:12] if self.pairs is not None else []
        at = 7 + len(pairs)
        router = {"router_aux_loss": reduced[at] / micro} if self.router is not None and micro else {}
        at += self.router is not None
        sums = reduced[at:]
        means = {name: sums[2 * i] / sums[2 * i + 1] for i, name in enumerate(names) if sums[2 * i + 1]}
        if not pairs and {"rewards_chosen", "rewards_rejected"} <= means.keys():  # kto, as TRL's margins
            means["reward_margin"] = means["rewards_chosen"] - means["rewards_rejected"]
        elapsed = max(time.perf_counter() - self.started - self.excluded_s, 1e-9)
        ranks = micro / max(1, self.micro_batches)
        if self.per_step:  # the steps' sums of shares, over ranks: the same step count on every rank
            finite = self.finite_steps
        return {
            # over steps (micro batches) with a finite loss: a skipped NaN step does not drag the mean; None if none
            "loss": loss_sum / finite if finite else None,
            "tokens": int(tokens),
            "samples": int(samples),
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "step_time_s": elapsed / max(1, steps),
            "data_wait_s": wait / ranks,  # mean over ranks, summed over the logged steps
            "skipped_now": int(skipped),  # bad records dropped since the last log, all ranks
            **pair_metrics(pairs),
            **router,  # MoE: the weighted load-balancing term added to the loss, mean per micro batch
            **by_source,
            **means,
        }

    def source_sums(self, device: torch.device) -> torch.Tensor:
        """[per-source loss sums, units, tokens] (empty without a mixture), for the one all-reduce."""
        if not self.sources:
            return torch.zeros(0, dtype=torch.float64, device=device)
        loss = self.source_loss if self.source_loss is not None else torch.zeros(self.sources)
        counts = np.concatenate([self.source_units, self.source_tokens])
        return torch.cat(
            [loss.to(device, torch.float64), torch.tensor(counts, dtype=torch.float64, device=device)]
        )


def pair_metrics(sums: list[float]) -> dict[str, float]:
    """Mean rewards, margin and preference accuracy from summed pair statistics (none for SFT)."""
    if not sums:
        return {}
    chosen, rejected, margin, right, count = sums
    count = max(count, 1.0)
    return {
        "rewards_chosen": chosen / count,
        "rewards_rejected": rejected / count,
        "reward_margin": margin / count,
        "pref_acc": right / count,
    }

"""One global sample order per epoch, cut into global batches and split across ranks.

The position in the data is global (step -> epoch, offset), never per rank: sample k of a global batch lands
on rank (k // micro) % world in accumulation slot k // (micro * world). A 2-rank run and a 1-rank run with
twice the accumulation therefore see the same samples in each optimizer step, and a run can restart at any
step on any world size that keeps the global batch. Restarting seeks (see `EpochOrder`): nothing is read
and thrown away.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from dstrain.config.run import DataConfig, RunConfig
from dstrain.config.sources import is_mixture
from dstrain.config.zero import BatchPlan
from dstrain.data.batches import IGNORE, Example, MicroBatch, collate, tokenize_record
from dstrain.data.grouping import LengthGroupedOrder
from dstrain.data.kto import KtoExample, read_example
from dstrain.data.mixture_order import MixtureOrder
from dstrain.data.packing import collate_flat, collate_packed
from dstrain.data.pairs import PairExample, collate_pairs, collate_shared_pairs, tokenize_pair
from dstrain.data.records import BadRecord
from dstrain.data.sharding import equal_rank_batches
from dstrain.data.source_batch import example_sources, pair_sources
from dstrain.data.stream import Corpus, EpochOrder, UnreadableRecordError
from dstrain.distributed.stop import ignore_in_worker
from dstrain.errors import DataError


class ExampleDataset(Dataset):
    """Examples already in memory (eval sets, tests)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class TokenizedCorpus(Dataset):
    """Records read and tokenised on demand (in DataLoader workers when there are any).

    A record that cannot be tokenised within the limits (an over-long prompt) comes back as a BadRecord
    naming its file and line; the loop applies data.on_error to it. One that cannot be read as indexed
    (its file changed) comes back as a fatal BadRecord, which stops the run whatever the policy.
    In a mixture, `source_starts` holds each source's first corpus index: examples carry their source.
    """

    def __init__(
        self,
        corpus: Corpus,
        tokenizer: PreTrainedTokenizerBase,
        cfg: DataConfig,
        pairs: bool = False,
        source_starts: np.ndarray | None = None,
        kto: int = 0,
    ) -> None:
        self.corpus, self.tokenizer, self.cfg, self.pairs = corpus, tokenizer, cfg, pairs
        self.source_starts = source_starts  # a mixture's; KTO trains on one source (config/checks.py)
        self.kto = kto  # KTO examples per record (data/kto.py: 1 for kto records, 2 for pairs); 0: no KTO

    def __len__(self) -> int:
        return len(self.corpus) * (self.kto or 1)

    def sizes(self) -> np.ndarray:
        """Each item's stored record size (see data/index.py), what data.group_by_length sorts by."""
        sizes = np.concatenate([f.lengths for f in self.corpus.files]) if self.corpus.files else np.zeros(0)
        return np.repeat(sizes, self.kto) if self.kto > 1 else sizes

    def __getitem__(self, index: int) -> Example | PairExample | KtoExample | BadRecord:
        try:
            if self.kto:  # an answer and the mismatched answer KTO's reference point is estimated on
                return read_example(self.corpus, self.tokenizer, self.cfg, index, self.kto)
            record = self.corpus.read(index)
        except UnreadableRecordError as exc:  # returned, not raised: a worker's exception is a traceback
            return exc.bad
        except ValueError as exc:  # a KTO example that does not fit (data/kto.py), a bad record like any
            return BadRecord(*self.corpus.origin(index // (self.kto or 1)), str(exc), index=index)
        source = 0 if self.source_starts is None else self.source_of(index)
        try:
            if self.pairs:  # preference objectives: prompt, chosen and rejected for one forward
                return replace(tokenize_pair(self.tokenizer, record, self.cfg), index=index, source=source)
            example = tokenize_record(self.tokenizer, record, self.cfg)
            return example if source == 0 else replace(example, source=source)
        except ValueError as exc:
            return BadRecord(*self.corpus.origin(index), str(exc), index=index)

    def source_of(self, index: int) -> int:
        assert self.source_starts is not None
        return int(np.searchsorted(self.source_starts, index, side="right")) - 1


def collate_micro(
    items: Sequence[Example | PairExample | KtoExample | BadRecord],
    pad_id: int,
    pack_to: int = 0,
    pairs: bool = False,
    share_prompt: bool = False,
    flat: bool = False,
    sources: int = 0,
    kto: bool = False,
) -> MicroBatch:
    """Drop bad items, then pad (or with `pack_to` > 0, pack into rows of at most that many tokens); with
    `pairs`, chosen rows then rejected rows, or with `share_prompt` one row per pair (see data/pairs.py);
    with `flat`, one unpadded row for flash-attention's variable-length path (data/packing.py); with `kto`,
    KTO examples as pairs of (answer, mismatched answer) and their labels (data/kto.py). A mixture of
    `sources` sources also gets its per-source counts (data/source_batch.py).

    A micro batch whose every item is bad still yields one row (a pad token without labels): every rank
    must run the same number of forwards, which are collectives under ZeRO-3. `tokens` counts the
    non-padding tokens the model runs on.
    """
    bad = [item for item in items if isinstance(item, BadRecord)]
    if kto:
        examples = [item for item in items if isinstance(item, KtoExample)]
        batch = collate_pair_rows([e.pair() for e in examples], bad, pad_id, share_prompt)
        batch.desirable = torch.tensor([e.desirable for e in examples] or [False])  # a filler: not desirable
        return batch
    if pairs:
        good_pairs = [item for item in items if isinstance(item, PairExample)]
        batch = collate_pair_rows(good_pairs, bad, pad_id, share_prompt)
        if sources:
            batch.sources = pair_sources(good_pairs, sources, share_prompt)
        return batch
    good = [item for item in items if isinstance(item, Example)]
    rows = good or [Example([pad_id], [IGNORE])]
    if flat:  # packing under flash_attention_2: one row, variable-length attention
        inputs = collate_flat(rows, pad_id)
    elif pack_to:
        inputs = collate_packed(rows, pad_id, pack_to)
    else:
        inputs = collate(rows, pad_id)
    by_source = example_sources(good, inputs, sources, pack_to, flat) if sources else None
    return MicroBatch(inputs, sum(len(e.input_ids) for e in good), len(good), bad, sources=by_source)


def collate_pair_rows(
    good_pairs: list[PairExample], bad: list[BadRecord], pad_id: int, share_prompt: bool
) -> MicroBatch:
    """Pair rows (data/pairs.py) of the good pairs; a filler pair without answers when there are none."""
    rows = good_pairs or [PairExample([pad_id], [], [])]
    if share_prompt:
        inputs = collate_shared_pairs(rows, pad_id)
        tokens = sum(len(p.prompt_ids) + 1 + len(p.chosen_ids) + len(p.rejected_ids) for p in good_pairs)
    else:
        inputs = collate_pairs(rows, pad_id)
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in good_pairs)
    return MicroBatch(inputs, tokens, len(good_pairs), bad, [p.index for p in good_pairs])


def steps_per_epoch(num_samples: int, plan: BatchPlan) -> int:
    steps = num_samples // plan.global_batch
    if steps == 0:
        raise DataError(
            f"data.train has {num_samples} usable samples, fewer than one global batch of {plan.global_batch} "
            f"(micro {plan.micro} x accumulation {plan.accumulation} x world {plan.world}): add data or shrink "
            "the batch in the ZeRO JSON"
        )
    return steps


class MicroBatchSampler(Sampler[list[int]]):
    """This rank's micro batches for steps [start_step, total_steps), `plan.accumulation` per step; from
    one shuffled order per epoch, or from a mixture's global batches (data/mixture_order.py)."""

    def __init__(
        self,
        num_samples: int,
        plan: BatchPlan,
        rank: int,
        seed: int,
        total_steps: int,
        start_step: int = 0,
        shuffle_block: int = 128,
        shuffle_window: int = 64,
        group: tuple[np.ndarray, int] | None = None,
        mixture: MixtureOrder | None = None,
    ) -> None:
        self.num_samples, self.plan, self.rank, self.seed = num_samples, plan, rank, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.block, self.window = shuffle_block, shuffle_window
        self.group = group  # (record sizes, micro batches per window) for data.group_by_length
        self.mixture = mixture
        self.per_epoch = steps_per_epoch(num_samples, plan) if mixture is None else 0

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.plan.accumulation

    def order(self, epoch: int) -> EpochOrder | LengthGroupedOrder:
        order = EpochOrder(self.num_samples, self.seed, epoch, self.block, self.window)
        if self.group is None:
            return order
        sizes, window = self.group
        return LengthGroupedOrder(order, sizes, self.plan.micro, window, self.plan.global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        if self.mixture is not None:
            yield from self.mixture_batches(self.mixture)
            return
        order: EpochOrder | LengthGroupedOrder | None = None
        micro, world = self.plan.micro, self.plan.world
        for step in range(self.start_step, self.total_steps):
            epoch, slot = divmod(step, self.per_epoch)
            if order is None or order.epoch != epoch:
                order = self.order(epoch)
            base = slot * self.plan.global_batch
            for accum in range(self.plan.accumulation):
                offset = base + (accum * world + self.rank) * micro
                yield order.ids(offset, offset + micro)

    def mixture_batches(self, mixture: MixtureOrder) -> Iterator[list[int]]:
        """The same cut of each global batch into ranks and accumulation slots, from the mixture's batches."""
        micro, world = self.plan.micro, self.plan.world
        for step in range(self.start_step, self.total_steps):
            ids = mixture.batch(step)
            for accum in range(self.plan.accumulation):
                offset = (accum * world + self.rank) * micro
                yield ids[offset : offset + micro].tolist()


@dataclass(frozen=True)
class LoaderOptions:
    """How `train_loader` orders samples and lays out micro batches; `for_run` makes a run's choices."""

    pad_id: int
    # order: a private shuffle per epoch (data/stream.py), optionally grouped by length (data/grouping.py)
    seed: int = 0
    shuffle_block: int = 128
    shuffle_window: int = 64
    group_sizes: np.ndarray | None = None  # each record's size when grouping by length, else None
    group_window: int = 64  # micro batches per length-sorted window
    # layout (see collate_micro)
    pack_to: int = 0
    flat: bool = False
    pairs: bool = False
    share_prompt: bool = False
    kto: bool = False
    num_workers: int = 0
    mixture: MixtureOrder | None = None  # a mixture's global batches (data/mixture_order.py), else None

    @classmethod
    def for_run(cls, cfg: RunConfig, dataset: TokenizedCorpus, pad_id: int) -> LoaderOptions:
        data = cfg.data
        # flash-attention takes no 4D block mask: it packs into one unpadded row with sequence boundaries
        flash = cfg.model.attn_implementation == "flash_attention_2"
        return cls(
            pad_id=pad_id,
            seed=data.seed,
            shuffle_block=data.shuffle_block,
            shuffle_window=data.shuffle_window,
            # a mixture groups by length itself, reading sizes from the index (never all of them at once)
            group_sizes=dataset.sizes() if data.group_by_length and not is_mixture(data.train) else None,
            group_window=data.length_group_window,
            pack_to=data.max_seq_len if data.packing and not flash else 0,
            flat=data.packing and flash,
            pairs=dataset.pairs,
            share_prompt=data.share_prompt,
            kto=bool(dataset.kto),
            num_workers=data.num_workers,
        )

    @property
    def group(self) -> tuple[np.ndarray, int] | None:
        """MicroBatchSampler's (record sizes, micro batches per window); None without length grouping."""
        return None if self.group_sizes is None else (self.group_sizes, self.group_window)


def train_loader(
    dataset: Dataset,
    plan: BatchPlan,
    options: LoaderOptions,
    rank: int,
    total_steps: int,
    start_step: int = 0,
) -> DataLoader:
    """MicroBatches of `dataset` for this rank, from `start_step` on, ordered and laid out per `options`."""
    sampler = MicroBatchSampler(
        len(dataset),
        plan,
        rank,
        options.seed,
        total_steps,
        start_step,
        options.shuffle_block,
        options.shuffle_window,
        options.group,
        options.mixture,
    )
    collate_fn = partial(
        collate_micro,
        pad_id=options.pad_id,
        pack_to=options.pack_to,
        pairs=options.pairs,
        share_prompt=options.share_prompt,
        flat=options.flat,
        sources=len(options.mixture.sources) if options.mixture is not None else 0,
        kto=options.kto,
    )
    workers = options.num_workers
    # A private generator: creating the iterator draws a worker seed from it, and drawing from the global
    # one would shift dropout after a resume (the resumed run creates its iterator at another step).
    return DataLoader(
        dataset,
        generator=torch.Generator().manual_seed(options.seed),
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        worker_init_fn=ignore_in_worker if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: the copy to the GPU can be async
    )


def eval_batches(
    examples: Sequence[Example | PairExample | KtoExample],
    micro: int,
    rank: int,
    world: int,
    pad_id: int,
    share_prompt: bool = False,
) -> Iterator[MicroBatch]:
    """This rank's share of the eval set, in the same number of batches on every rank (data/sharding.py).

    Short shares are topped up with a copy of the first example whose labels are all ignored (a pair
    without answers), so it adds nothing to the loss.
    """
    first = examples[0]
    pairs, kto = isinstance(first, PairExample), isinstance(first, KtoExample)
    if pairs:
        filler = PairExample(first.prompt_ids, [], [])
    elif kto:
        filler = KtoExample(first.prompt_ids, [], [], desirable=False)
    else:
        filler = Example(first.input_ids, [IGNORE] * len(first.input_ids))
    for batch, _ in equal_rank_batches(examples, micro, rank, world, filler):
        yield collate_micro(batch, pad_id, pairs=pairs, share_prompt=share_prompt, kto=kto)

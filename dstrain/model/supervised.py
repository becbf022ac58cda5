"""The module DeepSpeed wraps: a PEFT causal LM whose forward returns the loss terms, not the logits.

The output head runs only at positions that carry a label, and in chunks of `logits_chunk_tokens`
positions, each recomputed in backward: no [tokens, vocab] logits tensor larger than one chunk ever exists.
With 32k-152k vocabularies the full [batch, seq, vocab] logits are most of the activation memory, and on
RAG data most positions are prompt and passages, which carry no loss.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from torch import nn

from dstrain.data.batches import IGNORE
from dstrain.distributed import sequence
from dstrain.errors import ConfigError
from dstrain.model import moe, windows
from dstrain.model.exact import exact_logits, exact_target_logps
from dstrain.model.families import HeadPath, choose_path
from dstrain.model.head import SupervisedHead
from dstrain.model.selfcheck import CHECK_POSITIONS, own_rows, rebuilds_rows, spread
from dstrain.model.ulysses import plain_attention

HEAD_FIX = "set model.head: exact (the model's own forward)"


def check_supported(base: nn.Module, path: HeadPath) -> None:
    """Fail clearly for a model the chunked head cannot run: no output head, or no decoder to run first."""
    name = type(base).__name__
    if base.get_output_embeddings() is None:
        raise ConfigError([f"model.path: {name} has no output head (get_output_embeddings); not a causal LM"])
    if path.kind == "chunked" and base.get_decoder() is base:
        raise ConfigError(
            [f"model.head: {name} has no decoder / output-head split for the chunked head; {HEAD_FIX}"]
        )


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions (row x seq + t) of the hidden states that predict a label (label t + 1 is set).

    Computed where `labels` lives: dstrain.engine computes it on the host before the batch moves, so the
    device never has to report how many labels there are (a host sync per micro batch).
    """
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


def row_sums(
    token_logps: torch.Tensor, rows: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer row's summed log-prob [num_rows] (fp32) and count of labelled tokens [num_rows]."""
    totals = torch.zeros(num_rows, dtype=torch.float32, device=token_logps.device)
    counts = torch.zeros(num_rows, dtype=torch.long, device=token_logps.device)
    return totals.index_add(0, rows, token_logps), counts.index_add(0, rows, torch.ones_like(rows))


def group_nll(token_logps: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Summed NLL of the labelled tokens of each group [num_groups] (fp32, no gradient: for metrics), from
    each token's group id (a mixture's sources, data/source_batch.py)."""
    return row_sums(-token_logps.detach().float(), groups, num_groups)[0]


class SupervisedLM(nn.Module):
    def __init__(
        self,
        peft_model: PeftModel,
        logits_chunk_tokens: int = 1024,
        head: str = "auto",
        router_aux_loss_coef: float | None = None,
        groups: sequence.SequenceGroups | None = None,
    ) -> None:
        super().__init__()
        self.peft_model = peft_model
        # sequence parallelism (distributed/sequence.py): each rank runs its slice of every row
        self.groups = groups
        base = peft_model.get_base_model()
        self.path = choose_path(base, head)
        check_supported(base, self.path)
        self.head = None
        if self.path.kind == "chunked":
            self.head = SupervisedHead(base.get_output_embeddings(), logits_chunk_tokens, self.path.transform)
        self.aux_coef = moe.aux_coef(base, router_aux_loss_coef)
        # found once: moe.decoder_kwargs walks the model's modules, too much for every forward
        self.router_kwargs = moe.decoder_kwargs(base, self.aux_coef)
        self.kinds = windows.layer_kinds(base.config)  # which layers slide: their masks (windows.py)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        label_rows: torch.Tensor | None = None,
        label_index: torch.Tensor | None = None,
        pairs: bool = False,
        policy: bool = True,
        reference: bool = True,
        aux: bool = False,
        check: bool = False,
        label_groups: torch.Tensor | None = None,
        num_groups: int = 0,
        **varlen: torch.Tensor | int,
    ) -> tuple[torch.Tensor | None, ...]:
        """(summed NLL over supervised tokens, number of supervised tokens); with `pairs`, per answer row:
        (policy log-prob [N], reference log-prob [N], supervised tokens [N]).

        `attention_mask` is [batch, seq] for padded rows, or a [batch, 1, seq, seq] block mask with
        `position_ids` for packed rows (data/packing.py) and shared-prompt pairs (data/pairs.py). For the
        latter, `label_rows` [batch, seq] names the answer row (chosen b, rejected B+b) of each label.
        `label_index` is `labelled_positions(labels)`, when the caller has it already. `varlen` holds
        flash-attention's `cu_seq_lens_q/k` and `max_length_q/k` for a flat packed row (data/packing.py),
        with `attention_mask` None.
        The reference is the same model with its adapter disabled: no second model in memory, and under
        ZeRO-3 the same partitioned weights. `policy=False` or `reference=False` skips that pass (its slot
        is None): precomputed reference log-probs need only the policy, precomputing them only the reference.
        `aux` appends the MoE router's weighted load-balancing loss of the (policy) pass (0 for a dense
        model). `check` returns the self-check's numbers instead (selfcheck.py). SFT with `label_groups`
        (each position's group, like `labels`) appends each group's summed NLL [num_groups], for metrics;
        under sequence parallelism each rank's part of it (summed over ranks where it is logged).
        """
        inputs = (input_ids, attention_mask, labels, position_ids, label_rows, label_index, varlen)
        if check:  # under sequence parallelism: whole rows on every rank, unsharded attention, no grad
            with plain_attention(self.peft_model.get_base_model()):
                return self._check(*inputs)
        groups = (label_groups, num_groups) if label_groups is not None and not pairs else None
        if self.groups is not None:
            return self._sharded(inputs, pairs, policy, reference, aux, groups)
        if not pairs:
            logps, index, router = self._labelled_logps(*inputs, router=aux)
            terms = (-logps.sum(), torch.full((), index.numel(), device=logps.device))
            terms = (*terms, router) if aux else terms
            if groups is not None:
                terms = (*terms, group_nll(logps, groups[0].reshape(-1)[index + 1], num_groups))
            return terms
        policy_logps = tokens = reference_logps = None
        router = torch.zeros((), device=input_ids.device)
        if policy:
            policy_logps, tokens, router = self._row_logps(*inputs, router=aux)
        if reference:
            with torch.no_grad(), self.peft_model.disable_adapter():
                reference_logps, tokens, _ = self._row_logps(*inputs)
        terms = (policy_logps, reference_logps, tokens)
        return (*terms, router) if aux else terms

    def _labelled_logps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None,
        label_rows: torch.Tensor | None = None,
        label_index: torch.Tensor | None = None,
        varlen: dict[str, torch.Tensor | int] | None = None,
        router: bool = False,
        exact: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of each labelled token [K] in fp32, their predicting positions [K] as flat indices,
        the weighted router loss, 0 unless `router` on an MoE model). `exact`: the model's own forward."""
        index = labelled_positions(labels) if label_index is None else label_index
        targets = labels.reshape(-1)[index + 1]
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        logps, router_loss = self._decode(
            kwargs | dict(varlen or {}), index, targets, labels.shape[1], router, exact
        )
        return logps, index, router_loss

    def _decode(
        self,
        kwargs: dict[str, Any],
        index: torch.Tensor,
        targets: torch.Tensor,
        width: int,
        router: bool = False,
        exact: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of `targets` [K] at the flat hidden positions `index` [K] of rows `width` wide, the
        weighted router loss): the decoder, then the chunked head (or the model's own forward: `exact`)."""
        base = self.peft_model.get_base_model()
        inputs = self._with_layer_masks(kwargs) | (self.router_kwargs if router else {})
        if exact or self.head is None:
            logits, outputs = exact_logits(base, index, width, inputs)
            logps = exact_target_logps(logits, targets)
        else:
            outputs = base.get_decoder()(**inputs)
            hidden = outputs.last_hidden_state
            logps = self.head(hidden.reshape(-1, hidden.shape[-1])[index], targets)
        return logps, self._router_loss(base, outputs, kwargs["attention_mask"], router)

    def _with_layer_masks(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` with a 4-D record mask (packed rows, shared-prompt pairs) replaced by what each layer
        kind needs: the window in sliding layers, an additive mask for eager attention (windows.py)."""
        mask = kwargs["attention_mask"]
        if mask is None or mask.dim() != 4:
            return kwargs  # padded rows and the flat row: transformers builds each layer's mask itself
        base = self.peft_model.get_base_model()
        attention = getattr(base.config, "_attn_implementation", None) or "sdpa"
        masks = windows.layer_masks(self.kinds, mask, kwargs["position_ids"], attention, base.dtype)
        return kwargs | {"attention_mask": masks}

    def _router_loss(
        self, base: nn.Module, outputs: Any, attention_mask: torch.Tensor | None, wanted: bool
    ) -> torch.Tensor:
        zero = torch.zeros((), device=base.device)
        if not wanted or self.aux_coef == 0.0:
            return zero
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        loss = moe.aux_loss(base, outputs, padding)
        return zero if loss is None else self.aux_coef * loss

    def _row_logps(
        self, *inputs: Any, router: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed log-prob of each answer row's labelled tokens [N] (fp32), each row's count of them [N],
        and the weighted router loss.

        Padded pairs have one answer per row; shared-prompt pairs two per row, placed by `label_rows`.
        """
        token_logps, index, router_loss = self._labelled_logps(*inputs, router=router)
        labels, label_rows = inputs[2], inputs[4]
        if label_rows is None:
            rows, num_rows = index // labels.shape[1], labels.shape[0]
        else:
            rows, num_rows = label_rows.reshape(-1)[index + 1], 2 * labels.shape[0]
        return (*row_sums(token_logps, rows, num_rows), router_loss)

    def _sharded(
        self,
        inputs: tuple[Any, ...],
        pairs: bool,
        policy: bool,
        reference: bool,
        aux: bool,
        label_groups: tuple[torch.Tensor, int] | None = None,
    ) -> tuple[torch.Tensor | None, ...]:
        """forward's terms under sequence parallelism: this rank runs its slice of every row, and each sum
        is the group's (sequence.group_sum: gradient to this rank's own tokens), so every rank of a group
        returns the values of the unsharded forward and DeepSpeed's gradient sum over the group is exact.
        The per-group NLL (`label_groups`) stays this rank's part: no collective for a metric."""
        groups = self.groups
        group = groups.sp_group
        rank = groups.get_sequence_parallel_rank()
        # SFT rows have no label_rows: the slice carries the label groups there, shifted and cut like labels
        rows = label_groups[0] if label_groups is not None else inputs[4]
        piece = sequence.shard_batch(*inputs[:4], rows, rank, groups.size)
        if not pairs:
            logps, index, router = self._slice_logps(piece, aux)
            count = torch.full((), index.numel(), device=logps.device)
            terms = (sequence.group_sum(-logps.sum(), group), sequence.group_total(count, group))
            terms = (*terms, self._group_router(router)) if aux else terms
            if label_groups is not None:
                terms = (*terms, group_nll(logps, piece.target_rows.reshape(-1)[index], label_groups[1]))
            return terms
        policy_logps = tokens = reference_logps = None
        router = torch.zeros((), device=inputs[0].device)
        if policy:
            totals, counts, router = self._slice_rows(piece, aux)
            policy_logps, tokens = sequence.group_sum(totals, group), sequence.group_total(counts, group)
        if reference:
            with torch.no_grad(), self.peft_model.disable_adapter():
                totals, counts, _ = self._slice_rows(piece)
            reference_logps, tokens = sequence.group_total(totals, group), sequence.group_total(counts, group)
        terms = (policy_logps, reference_logps, tokens)
        return (*terms, self._group_router(router)) if aux else terms

    def _group_router(self, router: torch.Tensor) -> torch.Tensor:
        """The mean of the group's router losses: each rank's covers its own slice of the tokens only, so
        under sequence parallelism it approximates the unsharded value (not equal to it)."""
        return sequence.group_sum(router, self.groups.sp_group) / self.groups.size

    def _slice_logps(
        self, piece: sequence.Slice, router: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """_labelled_logps on a rank's slice: its targets are already shifted (sequence.shard_batch)."""
        flat = piece.targets.reshape(-1)
        index = (flat != IGNORE).nonzero().squeeze(-1)
        kwargs: dict[str, Any] = {
            "input_ids": piece.input_ids,
            "attention_mask": piece.attention_mask,  # the whole sequence's (model/ulysses.py)
            "position_ids": piece.position_ids,
        }
        if piece.padding is not None:
            kwargs["sp_padding"] = piece.padding
        logps, router_loss = self._decode(kwargs, index, flat[index], piece.targets.shape[1], router)
        return logps, index, router_loss

    def _slice_rows(
        self, piece: sequence.Slice, router: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """_row_logps on a rank's slice: this rank's part of each answer row's sum and count."""
        logps, index, router_loss = self._slice_logps(piece, router)
        batch, width = piece.targets.shape
        if piece.target_rows is None:
            rows, num_rows = index // width, batch
        else:
            rows, num_rows = piece.target_rows.reshape(-1)[index], 2 * batch
        return (*row_sums(logps, rows, num_rows), router_loss)

    @torch.no_grad()
    def _check(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """The self-check's numbers at up to CHECK_POSITIONS supervised positions of this batch (selfcheck.py):
        (mean |log p| difference between this run's path and the model's own forward on the same batch,
        the same between that forward and each record's own padded row (0 for padded rows), the largest
        |logit| there, positions compared).

        Every rank runs the same forwards whatever its data (ZeRO-3 gathers in each), even with no labels:
        how many is the run's config (the head path, the batch layout), never the data.
        """
        input_ids, mask, labels, position_ids, label_rows, label_index, varlen = inputs
        index = labelled_positions(labels) if label_index is None else label_index
        picked = index[spread(index.numel(), CHECK_POSITIONS).to(index.device)]
        targets = labels.reshape(-1)[picked + 1]
        ours, _, _ = self._labelled_logps(*inputs[:5], picked, varlen)
        base = self.peft_model.get_base_model()
        rebuild = rebuilds_rows({"attention_mask": mask, "label_rows": label_rows, **varlen})
        own, logits = ours, None
        if self.head is not None or not rebuild:  # the exact path is the model's own forward on this batch
            batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, **varlen}
            logits, _ = exact_logits(base, picked, labels.shape[1], self._with_layer_masks(batch))
            own = exact_target_logps(logits, targets)
        rows = own
        if rebuild:
            ids, row_mask, row_index = own_rows(input_ids, position_ids, picked)
            row_inputs = {"input_ids": ids, "attention_mask": row_mask}
            logits, _ = exact_logits(base, row_index, ids.shape[1], row_inputs)
            rows = exact_target_logps(logits, targets)
        count = torch.full((), picked.numel(), device=ours.device)
        if picked.numel() == 0:
            zero = torch.zeros((), device=ours.device)
            return zero, zero, zero, count
        head_diff, rows_diff = (ours - own).abs().mean(), (own - rows).abs().mean()
        return head_diff, rows_diff, logits.float().abs().max(), count

"""KTO examples: one answer, desirable or not, beside the mismatched answer that estimates KTO's reference point.

KTO (Ethayarajh et al. 2024) compares each answer's policy/reference log-ratio with a reference point z0, the
policy's KL divergence from the reference, estimated on mismatched pairs: a prompt followed by an answer
written for another prompt. TRL's KTOTrainer gives each example the previous example's answer within a block
of its dataset, fixed once at `dataset.map` time (and asks for sequential sampling, so that the block is the
batch). dstrain shuffles, so the partner is fixed per example instead: record r's mismatched answer is record
(r + n // 2) mod n's (n records). Fixed, so a precomputed reference holds its log-prob too
(objective.precompute_reference); half the corpus away, so that records written sample by sample (`dstrain
convert --from ddr --to kto` writes a DDR sample's answers one after the other) never pair two answers to the
same query.

Examples per record: a kto file gives one; a preference file gives two (example 2r: the chosen answer,
desirable; 2r + 1: the rejected one, undesirable), each mismatched with the partner record's answer of the
same side. Collated as a pair (data/pairs.py) whose first answer row is the example's answer and whose second
is the mismatched one after the same prompt, so shared-prompt rows (data.share_prompt) run the prompt once.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from dstrain.config.run import DataConfig
from dstrain.data.batches import answer_room, rag_tokens
from dstrain.data.pairs import PairExample
from dstrain.data.records import RagRecord
from dstrain.data.stream import Corpus

MIN_RECORDS = 2  # the mismatched answer must come from another record


@dataclass(frozen=True)
class KtoExample:
    """One tokenised KTO example; both answers end in EOS (when the tokenizer has one) unless cut."""

    prompt_ids: list[int]
    answer_ids: list[int]
    kl_ids: list[int]  # another record's answer after this prompt: KTO's reference point is estimated on it
    desirable: bool
    index: int = -1  # the example's number in its set (precomputed reference log-probs, eval's table)
    paired: bool = False  # from a preference pair: example 2r is pair r's chosen answer, 2r + 1 its rejected

    def pair(self) -> PairExample:
        """The example as pair rows: its answer first, the mismatched answer second."""
        return PairExample(self.prompt_ids, self.answer_ids, self.kl_ids, self.index)


def examples_per_record(fmt: str) -> int:
    """KTO examples one record of `fmt` gives: a preference pair gives two, a kto record one."""
    return 2 if fmt == "preference" else 1


def partner(record: int, records: int) -> int:
    """The record whose answer is mismatched with `record`'s prompt: half the corpus away."""
    return (record + max(1, records // 2)) % records


def side(record: RagRecord, which: int) -> tuple[str, bool]:
    """(answer, desirable) of a kto record (which = 0), or of a preference pair's chosen (0) or rejected (1)."""
    if record.desirable is not None:
        return record.answer, record.desirable
    return (record.answer, True) if which == 0 else (record.rejected or "", False)


def read_example(
    corpus: Corpus, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, index: int, per_record: int
) -> KtoExample:
    """Example `index` of `corpus` read as KTO examples, `per_record` to a record. The prompt is tokenised
    once for both answers; each answer is cut on its own so prompt + answer <= data.max_seq_len."""
    number, which = divmod(index, per_record)
    record = corpus.read(number)
    answer, desirable = side(record, which)
    mismatched, _ = side(corpus.read(partner(number, len(corpus))), which)
    prompt, (answer_ids, kl_ids) = rag_tokens(tokenizer, record, cfg, answer, mismatched)
    room = answer_room(len(prompt), cfg)
    return KtoExample(prompt, answer_ids[:room], kl_ids[:room], desirable, index, paired=per_record == 2)


def describe(fmt: str, records: int) -> str:
    """The start-up line that says what KTO trains on."""
    if fmt == "preference":
        return (
            f"kto: each of the {records:,} preference pairs gives one desirable (chosen) and one undesirable "
            f"(rejected) example: {2 * records:,} examples; the reference point pairs each prompt with the "
            "answer of the pair half the data away"
        )
    return (
        f"kto: {records:,} labelled examples; the reference point pairs each prompt with the answer of the "
        "record half the data away"
    )

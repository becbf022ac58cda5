"""RAGEval-style records (`rageval` -> sft-rag): {"query": {"content", ...}, "ground_truth": {"content",
"references": [str], "keypoints": [str]}, "prediction": {"content", "references": [str]}, "domain", ...}.

The answer is `ground_truth.content`. The passages are `prediction.references` (what the evaluated system
retrieved, so training sees retrieval as it will be), or `ground_truth.references` when the prediction has
none; `--passages-from prediction|ground_truth` forces one of them.
"""

from __future__ import annotations

from dstrain.data.convert.registry import Options, mapping, register, strings, text


def _is_rageval(obj: dict) -> bool:
    return isinstance(obj.get("query"), dict) and isinstance(obj.get("ground_truth"), dict)


@register("rageval", targets=("sft-rag",), detect=_is_rageval)
def rageval(obj: dict, to: str, opts: Options) -> dict:
    """RAGEval-style: query.content, ground_truth.content, passages from prediction or ground_truth references."""
    truth = mapping(obj, "ground_truth")
    query = text(mapping(obj, "query"), "content", "query.")
    answer = text(truth, "content", "ground_truth.")
    predicted: list[str] = []
    if opts.passages_from != "ground_truth":
        prediction = obj.get("prediction")
        predicted = strings(prediction, "references", "prediction.", required=False) if prediction else []
    passages = predicted
    if not predicted and opts.passages_from != "prediction":
        passages = strings(truth, "references", "ground_truth.", required=False)
    return {"query": query, "retrieval_result": passages, "answer": answer}

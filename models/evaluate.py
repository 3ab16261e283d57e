"""Evaluate a checkpoint: ``evssm eval CHECKPOINT [--split test]``.

Accuracy and loss on a split, computed twice: with the offline form (whole recordings, batched)
and by streaming every recording through the streaming form in packets of ``--packet-events``
with the state carried. The two must agree (docs/architecture.md, "The invariant"); the command
fails if they do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

PROB_TOLERANCE = 1e-4


def classification_metrics(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray
                           ) -> dict[str, float]:
    """Weighted accuracy and cross-entropy: logits [N, C], labels [N], weights [N]."""
    z = logits - logits.max(-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(len(labels)), labels]
    total = max(float(weights.sum()), 1.0)
    return {"accuracy": float(((logits.argmax(-1) == labels) * weights).sum() / total),
            "loss": float((nll * weights).sum() / total), "count": float(weights.sum())}


def evaluate(model: Any, dataset: Any, *, batch_size: int = 32, packet_events: int = 256,
             pad_unit: int = 512, progress: bool = True) -> dict[str, Any]:
    """Offline and streaming logits of every sample of ``dataset`` under ``model``
    (a :class:`~evssm.models.streaming.StreamingModel`), with metrics and their agreement."""
    from tqdm import tqdm

    from .input_pipeline import eval_batches
    from .streaming import softmax

    num_classes = model.config.num_classes
    offline, streamed, labels, weights = [], [], [], []
    batches = eval_batches(dataset, batch_size, num_classes, pad_unit)
    for batch in tqdm(batches, total=-(-len(dataset) // batch_size), desc="evaluating",
                      disable=not progress, file=sys.stderr, dynamic_ncols=True):
        logits, ready = model.classify(batch.tokens, batch.gaps, batch.lengths)
        offline.append(np.asarray(logits))
        weights.append(batch.weights * np.asarray(ready))
        labels.append(batch.labels)
        # The same batch, streamed packet by packet with carried state.
        state = model.init_state(batch_size)
        for start in range(0, batch.tokens.shape[1], packet_events):
            lengths = np.clip(batch.lengths - start, 0, packet_events).astype(np.int32)
            if not lengths.any():
                break
            tokens = batch.tokens[:, start:start + packet_events]
            gaps = batch.gaps[:, start:start + packet_events]
            state, logits, _ = model.step(state, tokens, gaps, lengths)
        streamed.append(np.asarray(logits))
    offline_l, streamed_l = np.concatenate(offline), np.concatenate(streamed)
    labels_a, weights_a = np.concatenate(labels), np.concatenate(weights)
    real = weights_a > 0
    diff = np.abs(softmax(offline_l) - softmax(streamed_l))[real]
    return {
        "samples": int(real.sum()),
        "offline": classification_metrics(offline_l, labels_a, weights_a),
        "streaming": classification_metrics(streamed_l, labels_a, weights_a),
        "max_prob_difference": float(diff.max()) if diff.size else 0.0,
        "prediction_disagreements": int((offline_l.argmax(-1) != streamed_l.argmax(-1))[real].sum()),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/NAME/best)")
    parser.add_argument("--split", default="test", help="data split to evaluate")
    parser.add_argument("--dataset", help="data set (default: the checkpoint's task data set)")
    parser.add_argument("--data-dir", help="where data sets live (or EVSSM_DATA_DIR)")
    parser.add_argument("--limit", type=int, help="only the first N samples")
    parser.add_argument("--batch-size", type=int, default=32, help="recordings per offline batch")
    parser.add_argument("--packet-events", type=int, default=256,
                        help="packet size for the streaming pass")
    parser.add_argument("--json", action="store_true", help="print JSON only (no progress bar)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, read_metadata
    from .data import load_dataset
    from .streaming import StreamingModel

    try:
        meta = read_metadata(args.checkpoint)
        model = StreamingModel.load(args.checkpoint)
    except CheckpointError as exc:
        print(f"evssm eval: {exc}", file=sys.stderr)
        return 2
    name = args.dataset or meta.get("summary", {}).get("dataset") or meta.get("task")
    if not name:
        print("evssm eval: the checkpoint names no data set; pass --dataset", file=sys.stderr)
        return 2
    dataset = load_dataset(name, args.split, args.data_dir, limit=args.limit)
    result = evaluate(model, dataset, batch_size=args.batch_size,
                      packet_events=args.packet_events, progress=not (args.json or args.no_progress))
    result.update(checkpoint=str(args.checkpoint), dataset=name, split=args.split)
    agree = result["max_prob_difference"] <= PROB_TOLERANCE
    result["forms_agree"] = agree
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        off, st = result["offline"], result["streaming"]
        print(f"{name} / {args.split}: {result['samples']} samples")
        print(f"  offline form:   accuracy {off['accuracy']:.4f}  loss {off['loss']:.4f}")
        print(f"  streaming form: accuracy {st['accuracy']:.4f}  loss {st['loss']:.4f}  "
              f"({args.packet_events}-event packets)")
        print(f"  max probability difference {result['max_prob_difference']:.2e}, "
              f"{result['prediction_disagreements']} different predictions")
    if not agree:
        print("evssm eval: the offline and streaming forms disagree", file=sys.stderr)
        return 1
    return 0

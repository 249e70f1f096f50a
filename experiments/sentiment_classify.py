"""Sentiment classification case study: pretrain a small decoder, SFT it, compare with VADER.

Stage 1 pretrains a GPT-2-layout decoder from scratch on the training sentences of the VADER
human-rated corpora (full-sequence loss). Stage 2 fine-tunes it to answer " positive" or
" negative" after "<sentence>\\nSentiment:" for movie-review sentences whose mean human rating
is beyond +-min_abs_rating. The report (`evaluate`, also `rlft eval WORKDIR`; WORKDIR/eval/) gives
held-out test accuracy beside the VADER lexicon judge's accuracy (compound >= 0 -> positive) on
the same test sentences.

    rlft run experiments/sentiment_classify.py            # ~10 minutes on 2 CPU cores
    rlft run experiments/sentiment_classify.py:tiny       # well under a minute (tests)
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from rlft.data.batching import encode_example
from rlft.data.human_ratings import load_split
from rlft.eval.report import write_report
from rlft.recipes import sentiment
from rlft.generate.scoring import completion_logprobs
from rlft.parallel.sharding import make_mesh
from rlft.train.stages import run_sft_stage, sft_stage_config

LABELS = (" negative", " positive")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (the case study, ~10 min on CPU) and "tiny" (end-to-end smoke run)."""
    c = sentiment.base_config(preset, "sentiment_classify")
    c.data.update(min_abs_rating=0.5, max_test_examples=0)
    c.sft = sft_stage_config(steps=300, batch_size=32, learning_rate=3e-4, max_length=80)
    if preset == "tiny":
        c.data.max_test_examples = 128
        c.sft.update(steps=6, batch_size=16, save_every=3)
    return c


def _labelled(rows: list[dict], min_abs_rating: float) -> list[tuple[str, int]]:
    """(sentence, 1 if positive else 0) for sentences with |rating| > min_abs_rating."""
    return [(r["text"], int(r["rating"] > 0)) for r in rows if abs(r["rating"]) > min_abs_rating]


def _prompt(text: str) -> str:
    return f"{text}\nSentiment:"


def vader_accuracy(examples: list[tuple[str, int]]) -> float:
    """Accuracy of the VADER lexicon judge (compound >= 0 -> positive)."""
    compound = sentiment.vader_compound([t for t, _ in examples])
    return float(np.mean((compound >= 0).astype(int) == np.array([y for _, y in examples])))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain, fine-tune, then `evaluate` (WORKDIR/eval/report.json and report.md)."""
    data_dir = config.data.data_dir or None
    base = sentiment.pretrain_base(config, workdir)
    train_set = _labelled(load_split(config.data.source, "train", data_dir), config.data.min_abs_rating)
    sft_examples = [encode_example(base.tokenizer, _prompt(t), LABELS[y]) for t, y in train_set]
    run_sft_stage(name="sft", workdir=workdir, graphdef=base.graphdef, params=base.params,
                  examples=sft_examples, cfg=config.sft, mesh=base.mesh, seed=config.seed + 1,
                  pad_id=base.pad_id, base=base.source)
    return evaluate(config, workdir)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`rlft eval WORKDIR`: held-out test accuracy of the SFT stage's newest finished checkpoint
    beside VADER's and the majority class's; writes WORKDIR/eval/report.json and report.md."""
    data_dir = config.data.data_dir or None
    train_set = _labelled(load_split(config.data.source, "train", data_dir), config.data.min_abs_rating)
    test_set = _labelled(load_split(config.data.source, "test", data_dir), config.data.min_abs_rating)
    if config.data.max_test_examples:
        test_set = test_set[:config.data.max_test_examples]
    mesh = make_mesh(dict(config.mesh))
    model = sentiment.finished_stage(os.path.join(workdir, "sft"), mesh)
    # Classify by comparing log p(" negative" | prompt) with log p(" positive" | prompt).
    scores = [completion_logprobs(model.graphdef, model.params,
                                  [encode_example(model.tokenizer, _prompt(t), label) for t, _ in test_set],
                                  config.sft.max_length, model.tokenizer.pad_token_id, mesh)
              for label in LABELS]
    predictions = (scores[1] > scores[0]).astype(int)
    labels = np.array([y for _, y in test_set])
    report = {
        "test_examples": len(test_set),
        "train_examples": len(train_set),
        "model_accuracy": float(np.mean(predictions == labels)),
        "vader_accuracy": vader_accuracy(test_set),
        "majority_class_accuracy": float(max(labels.mean(), 1 - labels.mean())),
    }
    report["model_beats_vader"] = report["model_accuracy"] > report["vader_accuracy"]
    markdown = (f"# Sentiment classification: {config.data.source}\n\n"
                f"Held-out test sentences with |mean human rating| > {config.data.min_abs_rating}: "
                f"{len(test_set)} (training examples: {len(train_set)}).\n\n"
                "| classifier | test accuracy |\n|---|---|\n"
                f"| rlft decoder (pretrain + SFT) | {report['model_accuracy']:.3f} |\n"
                f"| VADER lexicon (compound >= 0) | {report['vader_accuracy']:.3f} |\n"
                f"| majority class | {report['majority_class_accuracy']:.3f} |\n")
    write_report(os.path.join(workdir, "eval"), report, markdown)
    return report

"""Reward model on real human ratings: Bradley–Terry on movie-review sentence pairs, against VADER.

Stage "pretrain" (shared with sentiment_classify: a small decoder pretrained on the VADER corpora's
training sentences) or, with `--config.init_from=RUN_DIR`, the pretrain stage of an earlier
sentiment run. Stage "reward" trains a ScalarModel (that backbone + a zero-initialised scalar
head) on pairs of training sentences whose mean human ratings differ by >= data.min_gap, the
higher-rated one preferred; sentences are framed as in pretraining (EOS, text, EOS) and scored
at the closing EOS. Afterwards the mean/std of its scores on the validation sentences go to
WORKDIR/reward/reward_stats.json (for reward normalisation in RL).

The report (`evaluate`, also `rlft eval WORKDIR`; WORKDIR/eval/) gives, on held-out test pairs built the same way from test sentences only, the
model's pairwise accuracy (r_chosen > r_rejected) beside the VADER judge's (compound of chosen >
compound of rejected; ties count as wrong, and also as 1/2 in a second column), and the Pearson
correlation with the human mean ratings of the test sentences of the model's scores and of VADER's
compound scores.

    rlft run experiments/sentiment_reward.py            # ~10 minutes on 2 CPU cores
    rlft run experiments/sentiment_reward.py:tiny       # about a minute (tests)
    rlft run experiments/sentiment_reward.py --config.init_from=runs/sentiment_classify
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from rlft.data.human_ratings import load_split
from rlft.data.preferences import encode_pairs, load_pairs, preference_data_config
from rlft.eval.report import write_report
from rlft.recipes import sentiment
from rlft.generate.scoring import read_reward_stats, sequence_scores, write_reward_stats
from rlft.parallel.sharding import make_mesh
from rlft.train.stages import reward_stage_config, run_reward_stage
from rlft.train.warm_start import scalar_model_from_lm

STAGE = "reward"


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (~10 min on CPU, beats VADER) and "tiny" (end-to-end smoke run)."""
    c = sentiment.base_config(preset, "sentiment_reward")
    c.init_from = ""  # an earlier sentiment run dir: reuse its tokenizer, model and init_stage params
    c.init_stage = "pretrain"
    for key, value in preference_data_config(min_gap=1.0, pairs_per_sentence=4.0).items():
        if key not in c.data:
            c.data[key] = value
    c.reward_model = ml_collections.ConfigDict(dict(head_init_std=0.0))
    # max_length 80 keeps EOS (where the reward is read) on 99.4% of the default tokenizer's sentences
    c.reward = reward_stage_config(steps=300, batch_size=32, learning_rate=1e-4, max_length=80)
    c.eval = ml_collections.ConfigDict(dict(max_test_pairs=2000, max_test_sentences=0,
                                            max_reference_sentences=0, batch_size=64))
    if preset == "tiny":
        c.data.max_pairs = 512
        c.reward.update(steps=6, batch_size=8, save_every=3, max_length=64)
        c.eval.update(max_test_pairs=64, max_test_sentences=64, max_reference_sentences=128, batch_size=32)
    return c


def check(config: ml_collections.ConfigDict) -> None:
    """Refuse an init_from / init_stage this experiment cannot start from, before anything is
    written (`sentiment.check_base_source`: a language-model stage of a sentiment run with this
    run's tokenizer and model). `run` calls it first too."""
    sentiment.check_base_source(config, os.path.basename(__file__))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain (or load) the base, train the reward model, write its reward_stats.json, then
    `evaluate` (WORKDIR/eval/report.json and report.md)."""
    check(config)  # before the run writes anything (init_from)
    train_pairs = load_pairs(config.data, "train")
    base = sentiment.pretrained_base(config, workdir)
    encode = lambda pairs: encode_pairs(base.tokenizer, pairs, add_eos=True, bos_id=base.eos_id)
    graphdef, params = scalar_model_from_lm(base.model_config, base.params, base.mesh,
                                            config.reward_model.head_init_std, config.seed)
    params = run_reward_stage(name=STAGE, workdir=workdir, graphdef=graphdef, params=params,
                              pairs=encode(train_pairs), cfg=config.reward, mesh=base.mesh,
                              seed=config.seed + 2, pad_id=base.pad_id, base=base.source)
    validation = load_split(config.data.source, "validation", config.data.data_dir or None)
    if config.eval.max_reference_sentences:
        validation = validation[:config.eval.max_reference_sentences]
    scores = sequence_scores(graphdef, params, [base.encode_sentence(r["text"]) for r in validation],
                             config.reward.max_length, base.pad_id, base.mesh, config.eval.batch_size)
    write_reward_stats(os.path.join(workdir, STAGE), scores, f"validation sentences of {config.data.source}",
                       add_bos=True, add_eos=True, max_length=config.reward.max_length)
    return evaluate(config, workdir)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`rlft eval WORKDIR`: pairwise accuracy and correlation with human ratings of the reward
    stage's newest finished checkpoint beside VADER's; writes WORKDIR/eval/report.json and report.md."""
    data_dir = config.data.data_dir or None
    train_pairs = load_pairs(config.data, "train")
    test_pairs = load_pairs(config.data, "test")
    if config.eval.max_test_pairs:
        test_pairs = test_pairs[:config.eval.max_test_pairs]
    mesh = make_mesh(dict(config.mesh))
    model = sentiment.finished_stage(os.path.join(workdir, STAGE), mesh)
    tok = model.tokenizer
    encode = lambda pairs: encode_pairs(tok, pairs, add_eos=True, bos_id=tok.eos_token_id)

    def score(examples):
        return sequence_scores(model.graphdef, model.params, examples, config.reward.max_length,
                               tok.pad_token_id, mesh, config.eval.batch_size)

    stats = read_reward_stats(os.path.join(workdir, STAGE))  # None until the run has written it
    encoded = encode(test_pairs)
    chosen = score([c for c, _ in encoded])
    rejected = score([r for _, r in encoded])
    vader_c = sentiment.vader_compound([p.chosen for p in test_pairs])
    vader_r = sentiment.vader_compound([p.rejected for p in test_pairs])
    sentences = load_split(config.data.source, "test", data_dir)
    if config.eval.max_test_sentences:
        sentences = sentences[:config.eval.max_test_sentences]
    ratings = np.array([r["rating"] for r in sentences])
    model_scores = score([sentiment.encode_sentence(tok, r["text"]) for r in sentences])
    vader_scores = sentiment.vader_compound([r["text"] for r in sentences])

    report = {
        "train_pairs": len(train_pairs), "test_pairs": len(test_pairs), "test_sentences": len(sentences),
        "min_gap": config.data.min_gap,
        "model_pairwise_accuracy": float(np.mean(chosen > rejected)),
        "vader_pairwise_accuracy": float(np.mean(vader_c > vader_r)),
        "vader_pairwise_accuracy_ties_half": float(np.mean((vader_c > vader_r) + 0.5 * (vader_c == vader_r))),
        "vader_pairwise_ties": float(np.mean(vader_c == vader_r)),
        "model_pearson": sentiment.pearson(model_scores, ratings),
        "vader_pearson": sentiment.pearson(vader_scores, ratings),
        "reward_stats": stats and {"mean": stats["mean"], "std": stats["std"]},
    }
    report["model_beats_vader"] = bool(
        report["model_pairwise_accuracy"] > report["vader_pairwise_accuracy_ties_half"]
        and report["model_pearson"] > report["vader_pearson"])
    markdown = (f"# Reward model on human ratings: {config.data.source}\n\n"
                f"Held-out test pairs (mean human ratings differ by >= {config.data.min_gap}, test-split "
                f"sentences only): {len(test_pairs)}; training pairs: {len(train_pairs)}; test sentences "
                f"for the correlation: {len(sentences)}.\n\n"
                "| judge | pairwise accuracy | Pearson r with human ratings |\n|---|---|---|\n"
                f"| rlft reward model | {report['model_pairwise_accuracy']:.3f} | {report['model_pearson']:.3f} |\n"
                f"| VADER compound (ties wrong) | {report['vader_pairwise_accuracy']:.3f} | "
                f"{report['vader_pearson']:.3f} |\n"
                f"| VADER compound (ties 1/2) | {report['vader_pairwise_accuracy_ties_half']:.3f} | |\n\n"
                + (f"Reward statistics on the validation sentences (reward/reward_stats.json): "
                   f"mean {stats['mean']:.3f}, std {stats['std']:.3f}.\n" if stats else
                   "No reward/reward_stats.json yet (the run writes it after training).\n"))
    write_report(os.path.join(workdir, "eval"), report, markdown)
    return report

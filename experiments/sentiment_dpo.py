"""DPO on real human ratings: steer a small LM towards positive movie-review sentences.

Pairs: a fixed prompt (data.prompt, "Write a positive movie review sentence:\\n") with two
training sentences whose mean human ratings differ by >= data.min_gap; the higher-rated one is
chosen. A fixed prompt makes the preference well defined (more positive is better) and lets one
policy be compared with its reference on any held-out pair; prompts built from a sentence's first
words would almost never be shared by two rated sentences.

Stages: "pretrain" (shared with the other sentiment experiments, or `--config.init_from=RUN_DIR`),
"sft" (the prompt followed by every training sentence, so the reference knows the format but has
no sentiment preference; `--config.sft.steps=0` skips it), then "dpo" against the frozen SFT
model (`dpo.loss_type=sigmoid|ipo`, `dpo.beta`, `dpo.label_smoothing`).

The report (`evaluate`, also `rlft eval WORKDIR`; WORKDIR/eval/) gives, on held-out test pairs (test sentences only), the implicit-reward accuracy
(β·log π/π_ref of the chosen sentence > that of the rejected one) and mean margin, beside two
context figures on the same pairs: the reference's own likelihood preference (log π_ref(chosen) >
log π_ref(rejected)) and the VADER judge (compound of chosen > compound of rejected); and the
same implicit-reward accuracy and margin on training pairs (train_implicit_reward_*), what DPO
fitted directly (0 and 0 when training leaves the policy at its reference).

    rlft run experiments/sentiment_dpo.py               # ~10 minutes on 2 CPU cores
    rlft run experiments/sentiment_dpo.py:tiny          # about a minute (tests)
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from rlft.data.human_ratings import load_split
from rlft.data.preferences import encode_pairs, load_pairs, preference_data_config
from rlft.objectives.dpo import check_dpo_args
from rlft.eval.report import write_report
from rlft.recipes import sentiment
from rlft.generate.scoring import completion_logprobs
from rlft.parallel.sharding import make_mesh
from rlft.train.stages import dpo_stage_config, run_dpo_stage, run_sft_stage, sft_stage_config

PROMPT = "Write a positive movie review sentence:\n"


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (~10 min on CPU) and "tiny" (end-to-end smoke run)."""
    c = sentiment.base_config(preset, "sentiment_dpo")
    c.init_from = ""  # an earlier sentiment run dir: reuse its tokenizer, model and init_stage params
    c.init_stage = "pretrain"
    for key, value in preference_data_config(min_gap=1.0, pairs_per_sentence=4.0, prompt=PROMPT).items():
        if key not in c.data:
            c.data[key] = value
    c.sft = sft_stage_config(steps=100, batch_size=32, learning_rate=3e-4, max_length=80)
    c.dpo = dpo_stage_config(steps=150, batch_size=16, learning_rate=5e-5, max_length=80, beta=0.1)
    c.eval = ml_collections.ConfigDict(dict(max_test_pairs=1000, batch_size=64))
    if preset == "tiny":
        c.data.max_pairs = 64  # one DPO epoch: 8 steps x 8 pairs, a clear effect on the training pairs
        c.sft.update(steps=4, batch_size=16, save_every=2)
        c.dpo.update(steps=8, batch_size=8, learning_rate=5e-4, save_every=4)
        c.eval.update(max_test_pairs=64, batch_size=32)
    return c


def check(config: ml_collections.ConfigDict) -> None:
    """Refuse an init_from / init_stage this experiment cannot start from, before anything is
    written (`sentiment.check_base_source`: a language-model stage of a sentiment run with this
    run's tokenizer and model). `run` calls it first too."""
    sentiment.check_base_source(config, os.path.basename(__file__))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain (or load) the base, SFT on the prompt format, DPO, then `evaluate` (WORKDIR/eval/)."""
    check_dpo_args(config.dpo.beta, config.dpo.label_smoothing, config.dpo.loss_type)  # fail before training
    check(config)  # before the run writes anything (init_from)
    train_pairs = load_pairs(config.data, "train")
    base = sentiment.pretrained_base(config, workdir)
    tok, eos, pad = base.tokenizer, base.eos_id, base.pad_id
    prompt_ids = [eos] + tok.encode(config.data.prompt, add_special_tokens=False)
    sentences = load_split(config.data.source, "train", config.data.data_dir or None)
    sft_examples = [(prompt_ids, tok.encode(r["text"], add_special_tokens=False) + [eos]) for r in sentences]
    reference = run_sft_stage(name="sft", workdir=workdir, graphdef=base.graphdef, params=base.params,
                              examples=sft_examples, cfg=config.sft, mesh=base.mesh, seed=config.seed + 1,
                              pad_id=pad, base=base.source)

    encode = lambda pairs: encode_pairs(tok, pairs, add_eos=True, bos_id=eos)
    run_dpo_stage(name="dpo", workdir=workdir, graphdef=base.graphdef, params=reference,
                  pairs=encode(train_pairs), cfg=config.dpo, mesh=base.mesh, seed=config.seed + 2, pad_id=pad,
                  reference_params=reference, base=os.path.join(workdir, "sft"))
    return evaluate(config, workdir)


def reference_stage(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The stage directory of DPO's reference: the SFT stage, or with sft.steps=0 the base it
    starts from (this run's pretrain stage, or init_from's init_stage)."""
    if config.sft.steps > 0:
        return os.path.join(workdir, "sft")
    if config.init_from:
        return os.path.join(config.init_from, config.init_stage)
    return os.path.join(workdir, "pretrain")


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`rlft eval WORKDIR`: implicit rewards of the DPO stage's newest finished checkpoint against
    its reference on held-out (and training) pairs, beside the reference's likelihood and VADER;
    writes WORKDIR/eval/report.json and report.md."""
    train_pairs = load_pairs(config.data, "train")
    test_pairs = load_pairs(config.data, "test")
    if config.eval.max_test_pairs:
        test_pairs = test_pairs[:config.eval.max_test_pairs]
    mesh = make_mesh(dict(config.mesh))
    ref_model = sentiment.finished_stage(reference_stage(config, workdir), mesh)
    policy = sentiment.finished_stage(os.path.join(workdir, "dpo"), mesh)
    tok = policy.tokenizer
    graphdef, reference, pad = policy.graphdef, ref_model.params, tok.pad_token_id
    encode = lambda pairs: encode_pairs(tok, pairs, add_eos=True, bos_id=tok.eos_token_id)
    policy = policy.params
    beta = config.dpo.beta

    def logps(params, encoded, column):
        return completion_logprobs(graphdef, params, [p[column] for p in encoded],
                                   config.dpo.max_length, pad, mesh, config.eval.batch_size)

    encoded = encode(test_pairs)
    ref_c, ref_r = logps(reference, encoded, 0), logps(reference, encoded, 1)
    pol_c, pol_r = logps(policy, encoded, 0), logps(policy, encoded, 1)
    reward_c, reward_r = beta * (pol_c - ref_c), beta * (pol_r - ref_r)
    # The same implicit rewards on training pairs (the first eval.max_test_pairs): what DPO fitted.
    fitted = encode(train_pairs[:config.eval.max_test_pairs or None])
    train_c = beta * (logps(policy, fitted, 0) - logps(reference, fitted, 0))
    train_r = beta * (logps(policy, fitted, 1) - logps(reference, fitted, 1))
    vader_c = sentiment.vader_compound([p.chosen for p in test_pairs])
    vader_r = sentiment.vader_compound([p.rejected for p in test_pairs])
    report = {
        "train_pairs": len(train_pairs), "test_pairs": len(test_pairs), "min_gap": config.data.min_gap,
        "loss_type": config.dpo.loss_type, "beta": beta,
        "implicit_reward_accuracy": float(np.mean(reward_c > reward_r)),
        "implicit_reward_margin": float(np.mean(reward_c - reward_r)),
        "train_implicit_reward_accuracy": float(np.mean(train_c > train_r)),
        "train_implicit_reward_margin": float(np.mean(train_c - train_r)),
        "reference_likelihood_accuracy": float(np.mean(ref_c > ref_r)),
        "vader_pairwise_accuracy": float(np.mean(vader_c > vader_r)),
        "policy_logp_chosen": float(np.mean(pol_c)), "policy_logp_rejected": float(np.mean(pol_r)),
        "reference_logp_chosen": float(np.mean(ref_c)), "reference_logp_rejected": float(np.mean(ref_r)),
    }
    markdown = (f"# DPO on human ratings: {config.data.source}\n\n"
                f"Prompt {config.data.prompt!r}; pairs of sentences whose mean human ratings differ by >= "
                f"{config.data.min_gap} (higher rated chosen). Held-out test pairs (test sentences only): "
                f"{len(test_pairs)}; training pairs: {len(train_pairs)}; loss {config.dpo.loss_type}, "
                f"beta {beta}.\n\n"
                "| on held-out pairs | pairwise accuracy |\n|---|---|\n"
                f"| DPO implicit reward β·log π/π_ref | {report['implicit_reward_accuracy']:.3f} |\n"
                f"| reference likelihood log π_ref | {report['reference_likelihood_accuracy']:.3f} |\n"
                f"| VADER compound | {report['vader_pairwise_accuracy']:.3f} |\n\n"
                f"Mean implicit-reward margin: {report['implicit_reward_margin']:.3f}. On the first "
                f"{len(train_c)} training pairs: implicit-reward accuracy "
                f"{report['train_implicit_reward_accuracy']:.3f}, mean margin "
                f"{report['train_implicit_reward_margin']:.3f}. Mean log-probs "
                f"(chosen / rejected): policy {report['policy_logp_chosen']:.2f} / "
                f"{report['policy_logp_rejected']:.2f}, reference {report['reference_logp_chosen']:.2f} / "
                f"{report['reference_logp_rejected']:.2f}.\n")
    write_report(os.path.join(workdir, "eval"), report, markdown)
    return report

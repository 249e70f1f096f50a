"""Seconds per PPO update of trl's PPOTrainer (``trl.experimental.ppo``, trl 1.12) on the RL-step workload.

Runs in the ``trl-1.12`` environment (see envs.py): 1.12 is the last trl with
``trl.experimental.ppo``. `benchmarks/rl_step.py` starts it and reads its one ``RESULT {json}`` line.

trl's PPO scores with a reward *model*, not a Python function: a random-init
``GPT2ForSequenceClassification(num_labels=1)`` of the tiny shape is the reward model and another
is the value model; the reference policy is a copy of the initial policy. One update = 32 rollouts
(32 different prompts of 16 tokens, one completion each, up to 48 new tokens, temperature 1), the
rollout forwards, then 4 PPO epochs over the 32 rollouts as one minibatch, i.e. 4 AdamW steps
(lr 1e-5). Everything else is trl 1.12's default (kl_coef 0.05, k1 estimator, no stop token, no
reward whitening, gradient checkpointing as its config has it).

Update time is the wall time between consecutive ``on_step_end`` callbacks (trl calls it once per
update; the first from ``on_train_begin``); the median leaves out the first ``--skip`` updates.
The breakdown, per update (PPOTrainer.train is one long loop, so the module functions it calls are
wrapped):

- ``sampling_s``: ``batch_generation`` — ``model.generate`` with per-step logits (old log-probs come
  from these logits, no separate forward);
- ``logprobs_s``: the reference policy's no-grad ``forward``;
- ``reward_s``: ``get_reward`` — value-model and reward-model forwards;
- ``scoring_s``: from the end of sampling to the first gradient-enabled forward — the above plus
  KL penalty, GAE advantages and whitening;
- ``update_s``: from the first gradient-enabled forward to the update's end — 4 x (policy+value
  forward, backward, AdamW), then trl's metrics and logging.

    python trl_ppo.py --steps 10 --skip 2 [--grad-ckpt 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl warns on importing trl.experimental

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

import workload  # noqa: E402
from trl_common import MethodTimer, StepTimer, environment_info, set_generation_ids, tiny_config  # noqa: E402
from workload import median_after, print_result, rounded  # noqa: E402

PPO_EPOCHS = 4
MINIBATCHES = 1


def build_trainer(grad_ckpt: bool | None, steps: int, out: str):
    """(trainer, StepTimer, MethodTimer, workload digest)."""
    tok, prompts = workload.build_workload()
    dataset = datasets.Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(tiny_config(tok))
    ref_policy = GPT2LMHeadModel(tiny_config(tok))
    ref_policy.load_state_dict(policy.state_dict())
    reward_model = GPT2ForSequenceClassification(tiny_config(tok, num_labels=1))
    value_model = GPT2ForSequenceClassification(tiny_config(tok, num_labels=1))
    for model in (policy, ref_policy):
        set_generation_ids(model, tok)

    rollouts = workload.COMPLETIONS_PER_STEP
    config = dict(
        output_dir=os.path.join(out, "ppo"),
        per_device_train_batch_size=rollouts,
        num_mini_batches=MINIBATCHES,
        num_ppo_epochs=PPO_EPOCHS,
        total_episodes=rollouts * steps,
        response_length=workload.MAX_NEW_TOKENS,
        temperature=workload.TEMPERATURE,
        learning_rate=workload.LEARNING_RATE,
        num_sample_generations=0,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    if grad_ckpt is not None:
        config["gradient_checkpointing"] = grad_ckpt
    args = PPOConfig(**config)

    steps_timer = StepTimer()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         callbacks=[steps_timer])
    # train() looks these up as globals of its module: wrap them there.
    loop = sys.modules[PPOTrainer.__module__]
    methods = MethodTimer(steps_timer)
    methods.wrap(loop, "batch_generation", "sampling")
    methods.wrap(loop, "get_reward", "reward")
    methods.wrap(loop, "forward", "logprobs", when=lambda: not torch.is_grad_enabled())
    methods.wrap(loop, "forward", "train_forward", when=torch.is_grad_enabled)
    return trainer, steps_timer, methods, workload.workload_digest(tok, prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="PPO updates to run")
    parser.add_argument("--skip", type=int, default=2, help="warm-up updates left out of the medians")
    parser.add_argument("--grad-ckpt", type=int, choices=[0, 1], default=None,
                        help="gradient checkpointing (default: trl's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="trainer output directory (default: a temporary one)")
    a = parser.parse_args()
    if a.steps <= a.skip:
        parser.error("--steps must exceed --skip")
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory(prefix="rlft-bench-trl-ppo-") as tmp:
        trainer, steps_timer, methods, digest = build_trainer(
            None if a.grad_ckpt is None else bool(a.grad_ckpt), a.steps, a.out or tmp)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start

    step_s = steps_timer.step_times()
    n = len(step_s)
    starts = steps_timer.step_starts()
    ends = steps_timer.ends
    sampling = methods.per_step("sampling", n)
    train_start = [methods.first_start["train_forward"].get(i, ends[i]) for i in range(n)]
    per_step = {
        "sampling_s": sampling,
        "logprobs_s": methods.per_step("logprobs", n),
        "reward_s": methods.per_step("reward", n),
        "scoring_s": [t - s0 - g for t, s0, g in zip(train_start, starts, sampling)],
        "update_s": [e - t for e, t in zip(ends, train_start)],
    }
    args = trainer.args
    optimizer_steps = args.num_ppo_epochs * args.num_mini_batches
    median = median_after(step_s, a.skip)
    eos = steps_timer.logged("val/num_eos_tokens")
    scores = steps_timer.logged("objective/scores")
    print_result({
        "peer": "trl PPO",
        "trainer": f"{PPOTrainer.__module__}.PPOTrainer",
        "completions_per_step": args.batch_size,
        "response_length": args.response_length,
        "prompt_tokens": workload.PROMPT_TOKENS,
        "num_ppo_epochs": args.num_ppo_epochs,
        "num_mini_batches": args.num_mini_batches,
        "optimizer_steps_per_update": optimizer_steps,
        "kl_coef": args.kl_coef,
        "stop_token_id": trainer.stop_token_id,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": n,
        "skip": a.skip,
        "median_step_s": median,
        "median_s_per_optimizer_step": median / optimizer_steps if median is not None else None,
        "step_s": rounded(step_s),
        "breakdown": {k: median_after(v, a.skip) for k, v in per_step.items()},
        "breakdown_per_step": {k: rounded(v) for k, v in per_step.items()},
        "eos_tokens_per_update": eos,
        "score_first_last": [scores[0], scores[-1]] if scores else None,
        "train_total_s": total,
        "workload_digest": digest,
        **environment_info(torch.get_num_threads()),
    })


if __name__ == "__main__":
    main()

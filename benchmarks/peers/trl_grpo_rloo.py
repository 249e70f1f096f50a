"""Seconds per optimizer step of trl's GRPOTrainer / RLOOTrainer on the RL-step workload.

Runs in the ``trl-1.16`` environment (see envs.py); `benchmarks/rl_step.py` starts it and reads
its one ``RESULT {json}`` line. The workload (workload.py): tiny random GPT-2, 4 prompts x 8
completions = 32 completions per step, 16 prompt tokens, up to 48 new tokens, temperature 1, reward
= letters 'a' in the completion text, lr 1e-5, one update per rollout (trl's ``num_iterations=1``).
Everything else is trl's default (GRPO: gradient checkpointing on, beta 0, loss ``dapo``; RLOO:
beta 0.05), unless ``--beta`` / ``--grad-ckpt`` say otherwise.

Step time is the wall time between consecutive ``on_step_end`` callbacks (the first from
``on_train_begin``); the median leaves out the first ``--skip`` steps. The breakdown wraps the
trainer's own methods and is added up per step:

- ``sampling_s``: ``_generate`` — prompt tokenisation, ``model.generate``, decoding to text;
- ``logprobs_s``: ``_get_per_token_logps_and_entropies`` calls made while scoring — the no-grad
  forwards for old log-probs (RLOO always; GRPO never at ``num_iterations=1``) and reference
  log-probs (when beta > 0);
- ``reward_s``: ``_calculate_rewards`` (the Python reward function);
- ``scoring_s``: ``_generate_and_score_completions`` minus ``_generate`` — log-probs, rewards,
  advantages and trl's bookkeeping;
- ``update_s``: the step minus ``_generate_and_score_completions`` — loss forward and backward,
  gradient clipping, AdamW, the Trainer's own per-step work.

    python trl_grpo_rloo.py --trainer grpo --steps 16 --skip 2 [--beta 0.04] [--grad-ckpt 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import datasets
import torch
import trl
from transformers import GPT2LMHeadModel

import workload
from trl_common import MethodTimer, StepTimer, environment_info, set_generation_ids, tiny_config
from workload import median_after, print_result, rounded


def build_trainer(trainer_name: str, beta: float | None, grad_ckpt: bool | None, steps: int, out: str):
    """(trainer, StepTimer, MethodTimer, workload digest) for ``trainer_name`` in {"grpo", "rloo"}."""
    tok, prompts = workload.build_workload()
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(tok))
    set_generation_ids(model, tok)
    # With beta > 0 trl builds the reference model from model.config._name_or_path: save the random
    # model locally and point there (nothing is downloaded).
    model_dir = os.path.join(out, "tiny-gpt2-random")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    model.config._name_or_path = model_dir

    config = dict(
        output_dir=os.path.join(out, trainer_name),
        per_device_train_batch_size=workload.COMPLETIONS_PER_STEP,  # completions per optimizer step
        num_generations=workload.GROUP_SIZE,  # -> 4 prompts x 8 completions
        max_completion_length=workload.MAX_NEW_TOKENS,
        temperature=workload.TEMPERATURE,
        learning_rate=workload.LEARNING_RATE,
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        save_strategy="no",
        disable_tqdm=True,
        use_vllm=False,
        seed=0,
        dataloader_num_workers=0,
    )
    if beta is not None:
        config["beta"] = beta
    if grad_ckpt is not None:
        config["gradient_checkpointing"] = grad_ckpt
    Config, Trainer = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer),
                       "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[trainer_name]
    args = Config(**config)
    assert args.num_iterations == 1, args.num_iterations

    steps_timer = StepTimer()
    trainer = Trainer(model=model, reward_funcs=workload.reward_count_a, args=args, train_dataset=dataset,
                      processing_class=tok, callbacks=[steps_timer])
    methods = MethodTimer(steps_timer)
    methods.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
    methods.wrap(trainer, "_generate", "sampling")
    methods.wrap(trainer, "_calculate_rewards", "reward")
    methods.wrap(trainer, "_get_per_token_logps_and_entropies", "logprobs",
                 when=lambda: methods.active("generate_and_score"))
    return trainer, steps_timer, methods, workload.workload_digest(tok, prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainer", choices=["grpo", "rloo"], default="grpo")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the medians")
    parser.add_argument("--beta", type=float, default=None, help="KL coefficient (default: trl's)")
    parser.add_argument("--grad-ckpt", type=int, choices=[0, 1], default=None,
                        help="gradient checkpointing (default: trl's, on)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="trainer output directory (default: a temporary one)")
    a = parser.parse_args()
    if a.steps <= a.skip:
        parser.error("--steps must exceed --skip")
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory(prefix="rlft-bench-trl-") as tmp:
        trainer, steps_timer, methods, digest = build_trainer(
            a.trainer, a.beta, None if a.grad_ckpt is None else bool(a.grad_ckpt), a.steps, a.out or tmp)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start

    step_s = steps_timer.step_times()
    n = len(step_s)
    gen_score = methods.per_step("generate_and_score", n)
    sampling = methods.per_step("sampling", n)
    per_step = {
        "sampling_s": sampling,
        "logprobs_s": methods.per_step("logprobs", n),
        "reward_s": methods.per_step("reward", n),
        "scoring_s": [g - s for g, s in zip(gen_score, sampling)],
        "update_s": [t - g for t, g in zip(step_s, gen_score)],
    }
    lengths = steps_timer.logged("completions/mean_length")
    rewards = steps_timer.logged("reward")
    args = trainer.args
    print_result({
        "peer": f"trl {a.trainer.upper()}",
        "trainer": type(trainer).__name__,
        "completions_per_step": workload.COMPLETIONS_PER_STEP,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "prompt_tokens": workload.PROMPT_TOKENS,
        "beta": args.beta,
        "loss_type": getattr(args, "loss_type", None),
        "gradient_checkpointing": args.gradient_checkpointing,
        "num_iterations": args.num_iterations,
        "steps": n,
        "skip": a.skip,
        "median_step_s": median_after(step_s, a.skip),
        "step_s": rounded(step_s),
        "breakdown": {k: median_after(v, a.skip) for k, v in per_step.items()},
        "breakdown_per_step": {k: rounded(v) for k, v in per_step.items()},
        "mean_completion_length": sum(lengths[a.skip:]) / len(lengths[a.skip:]) if lengths[a.skip:] else None,
        "reward_first_last": [rewards[0], rewards[-1]] if rewards else None,
        "train_total_s": total,
        "workload_digest": digest,
        **environment_info(torch.get_num_threads()),
    })


if __name__ == "__main__":
    main()

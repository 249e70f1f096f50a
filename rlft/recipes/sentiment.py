"""The sentiment case studies' shared base: config sections, tokenizer, pretraining, VADER judge.

Every sentiment experiment starts from a small GPT-2-layout decoder pretrained from scratch on the
training sentences of the VADER human-rated corpora (full-sequence loss, each sentence framed by
EOS), with a byte-level BPE trained on the same sentences. `pretrained_base` builds it in the
work directory (stage "pretrain", resumable) or, with `init_from=RUN_DIR`, reuses the tokenizer,
model config and pretrain-stage params of an earlier sentiment run.

Which runs `init_from` accepts (`check_base_source`, `check_adopted_stages`; each experiment's
`check(config)` calls one, before anything is written): a directory made by `rlft run` (with
experiment.json, run_config.json, model_config.json and tokenizer/) of one of `EXPERIMENTS`, whose
run_config.json `tokenizer` and `model` sections equal this run's (a field the record lacks reads
as `model_section`'s default; `model.remat` may differ: it is not a shape) and whose
model_config.json is the model this run's `model` section builds with that tokenizer. The
"pretrain" stage is the one stage every sentiment experiment shares; the other stages are an
experiment's own, so `sentiment_rlhf` adopts them only from a run of the same experiment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlft.train.checkpoints import load_model_config, save_model_config
from rlft.data.human_ratings import load_split
from rlft.data.tokenizer import load_tokenizer, train_tokenizer
from rlft.parallel.distributed import barrier, is_primary
from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig, model_from_section, model_section
from rlft.parallel.sharding import make_mesh, sharded_init
from rlft.train.stages import run_sft_stage, sft_stage_config

PRETRAIN_SOURCES = ("movie_reviews", "amazon", "nyt", "tweets")
# The experiment files built on this recipe (`base_config` + `pretrain_base`): a run of any of them
# has this tokenizer, this model family and the "pretrain" stage. A new sentiment experiment adds
# its file name here to be a source (and a target) of `init_from`.
EXPERIMENTS = ("sentiment_classify.py", "sentiment_reward.py", "sentiment_dpo.py", "sentiment_rlhf.py")
SHARED_STAGE = "pretrain"
_SOURCE_FILES = ("experiment.json", "run_config.json", "model_config.json", "tokenizer")


def base_config(preset: str, experiment: str) -> ml_collections.ConfigDict:
    """seed, data (source, pretrain_sources, data_dir), tokenizer, model, mesh, pretrain sections.

    Presets: "default" and "tiny" (a 2-layer d64 model and a few steps, for tests).
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(source="movie_reviews", pretrain_sources=PRETRAIN_SOURCES,
                                            data_dir=""))
    c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=2048))
    c.model = model_section(d_model=256, n_layers=4, n_heads=4, max_positions=128)
    # rollout: devices left to the RL sampler, a count or a fraction in (0, 1) of them (0: colocated;
    # `rlft.parallel.sharding.rollout_mesh`)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rollout=0.0))
    c.pretrain = sft_stage_config(steps=600, batch_size=32, learning_rate=1e-3, max_length=64,
                                  full_sequence_loss=True)
    if preset == "tiny":
        c.data.pretrain_sources = ("movie_reviews",)
        c.tokenizer.vocab_size = 512
        c.model.update(d_model=64, n_layers=2, n_heads=4)
        c.pretrain.update(steps=8, batch_size=16, save_every=4)
    elif preset != "default":
        raise RlftError(f"{experiment}: unknown preset {preset!r} (default, tiny)")
    return c


@dataclasses.dataclass
class Base:
    """A pretrained language model and what it was built with."""

    tokenizer: object
    model_config: ModelConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    params: nnx.State
    source: str  # the stage directory `params` come from (a LoRA stage records it as its base)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def encode_sentence(self, text: str) -> tuple[list[int], list[int]]:
        """`encode_sentence` with this base's tokenizer."""
        return encode_sentence(self.tokenizer, text)


def encode_sentence(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """([EOS], ids + [EOS]): a sentence framed as in pretraining (EOS opens and closes it)."""
    eos = tokenizer.eos_token_id
    return [eos], tokenizer.encode(text, add_special_tokens=False) + [eos]


def _tokenizer(config: ml_collections.ConfigDict, workdir: str, rows: Sequence[dict]):
    """The run's tokenizer: WORKDIR/tokenizer if saved, else trained on `rows`' texts and saved there."""
    tok_dir = os.path.join(workdir, "tokenizer")
    barrier("tokenizer")  # every process sees the same answer below (process 0 may write it next)
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        return load_tokenizer(tok_dir)
    return train_tokenizer((r["text"] for r in rows), config.tokenizer.vocab_size, tok_dir)


def pretrain_base(config: ml_collections.ConfigDict, workdir: str) -> Base:
    """Tokenizer, model config (saved in WORKDIR), mesh and the resumable "pretrain" stage's params."""
    data_dir = config.data.data_dir or None
    rows = [r for src in config.data.pretrain_sources for r in load_split(src, "train", data_dir)]
    tokenizer = _tokenizer(config, workdir, rows)
    model_cfg = model_from_section(config.model, len(tokenizer))
    save_model_config(workdir, model_cfg)
    mesh = make_mesh(dict(config.mesh))
    graphdef, params = sharded_init(lambda: Decoder(model_cfg, rngs=nnx.Rngs(config.seed)), mesh)
    base = Base(tokenizer, model_cfg, mesh, graphdef, params, os.path.join(workdir, "pretrain"))
    corpus = [base.encode_sentence(r["text"]) for r in rows]
    base.params = run_sft_stage(name="pretrain", workdir=workdir, graphdef=graphdef, params=params,
                                examples=corpus, cfg=config.pretrain, mesh=mesh, seed=config.seed,
                                pad_id=base.pad_id)
    return base


def base_from_run(run_dir: str, stage: str, workdir: str, mesh_shape: dict) -> Base:
    """The tokenizer, model config and STAGE params of an earlier run, copied into WORKDIR's metadata.

    The source is not judged here (`check_base_source` does that, before anything is written);
    the params are read before WORKDIR gets a file, so a stage that cannot be loaded copies nothing.
    """
    from rlft.train.warm_start import decoder_state

    stage_dir = os.path.join(run_dir, stage)
    if not os.path.isdir(run_dir):
        raise RlftError(f"init_from={run_dir}: no such run directory")
    if not os.path.isdir(stage_dir):
        raise RlftError(f"init_from={run_dir}: no stage directory {stage!r} there "
                        f"(set init_stage to one of its stages)")
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    model_cfg = load_model_config(run_dir)
    mesh = make_mesh(mesh_shape)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))))
    params = decoder_state(model_cfg, stage_dir, mesh)
    save_model_config(workdir, model_cfg)  # refuses (and writes nothing) if WORKDIR has another model
    if is_primary():
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    return Base(tokenizer, model_cfg, mesh, graphdef, params, stage_dir)


def _source_experiment(config: ml_collections.ConfigDict, experiment: str) -> str:
    """The experiment file name of the run `config.init_from`, after checking that EXPERIMENT (this
    run's file name) can start from it: a directory made by `rlft run` (`_SOURCE_FILES`), a run of
    one of `EXPERIMENTS`, its run_config.json `tokenizer` and `model` sections equal to this run's
    (fields the record lacks at `model_section`'s defaults; `model.remat` ignored), and its
    model_config.json the model this run's section builds for its tokenizer. Reads files only."""
    import json

    from rlft.config import ABSENT, changed_fields, format_changes, format_override
    from rlft.files import read_json

    src = config.init_from
    if not os.path.isdir(src):
        raise RlftError(f"init_from={src}: no such run directory")
    missing = [name for name in _SOURCE_FILES if not os.path.exists(os.path.join(src, name))]
    if missing:
        raise RlftError(f"init_from={src}: not a run directory {experiment} can start from "
                        f"(no {', '.join(missing)})")
    path = read_json(os.path.join(src, "experiment.json")).get("path")
    if not isinstance(path, str):
        raise RlftError(f"{os.path.join(src, 'experiment.json')}: no experiment path; the file is damaged")
    theirs = os.path.basename(path)
    if theirs not in EXPERIMENTS:
        raise RlftError(f"init_from={src}: a run of {theirs}, not of a sentiment experiment "
                        f"({', '.join(EXPERIMENTS)}); {experiment} cannot start from it")

    recorded = read_json(os.path.join(src, "run_config.json"))

    def shape(tokenizer, model) -> dict:
        model = {**model_section().to_dict(), **(model if isinstance(model, dict) else {})}
        model.pop("remat", None)  # how the backward is computed, not the parameters
        return json.loads(json.dumps({"tokenizer": tokenizer if isinstance(tokenizer, dict) else {},
                                      "model": model}))

    changes = changed_fields(shape(recorded.get("tokenizer"), recorded.get("model")),
                             shape(config.tokenizer.to_dict(), config.model.to_dict()))
    if changes:
        sections = [n for n in ("tokenizer", "model") if any(f.startswith(f"{n}.") for f, _, _ in changes)]
        short = (lambda f: f.split(".", 1)[1]) if len(sections) == 1 else (lambda f: f)
        what = " and ".join(sections)
        its = ", ".join(f"{short(f)}={old!r}" for f, old, _ in changes)
        ours = ", ".join(f"{short(f)}={new!r}" for f, _, new in changes)
        hint = " ".join(format_override(f, old) for f, old, _ in changes if old is not ABSENT)
        raise RlftError(f"init_from={src}: its {what} ({its}) differs from this run's {what} ({ours}): "
                        f"{format_changes(changes)}; run with its values ({hint}) or start from another run")

    saved = load_model_config(src)
    as_json = lambda cfg: json.loads(json.dumps(cfg.to_dict()))
    built = model_from_section(config.model, saved.vocab_size)
    if other := [c for c in changed_fields(as_json(saved), as_json(built)) if c[0] != "remat"]:
        raise RlftError(f"init_from={src}: its model_config.json describes another model than this run's "
                        f"model section builds: {format_changes(other)}")
    return theirs


def check_base_source(config: ml_collections.ConfigDict, experiment: str) -> None:
    """Refuse `config.init_from` (with `config.init_stage`) as the base of EXPERIMENT, before
    anything is written; nothing to check without init_from.

    The source must be a run of a sentiment experiment with this run's tokenizer and model
    (`_source_experiment`), and init_stage one of its language-model stages: the base is only a
    starting point, so any LM stage of any sentiment run will do (its "pretrain" by default).
    """
    from rlft.train.stages import read_stages

    if not config.get("init_from"):
        return
    _source_experiment(config, experiment)
    src, stage = config.init_from, config.init_stage
    kinds = {s["name"]: s["kind"] for s in read_stages(src)}
    lm_stages = [name for name, kind in kinds.items() if kind == "lm" and os.path.isdir(os.path.join(src, name))]
    if not os.path.isdir(os.path.join(src, stage)):
        raise RlftError(f"init_from={src}: no stage directory {stage!r} there (set init_stage to one of its "
                        f"language-model stages: {', '.join(lm_stages) or 'none'})")
    if kinds.get(stage, "lm") != "lm":
        raise RlftError(f"init_stage={stage!r}: a {kinds[stage]} stage of {src}, not a language model (its "
                        f"language-model stages: {', '.join(lm_stages) or 'none'})")


def check_adopted_stages(config: ml_collections.ConfigDict, experiment: str,
                         adoptable: Sequence[str]) -> None:
    """Refuse `config.init_from` / `config.init_stages` for `adopt_stages` into a run of EXPERIMENT,
    before anything is written; nothing to check without init_from.

    init_stages must be among `adoptable`; the source a run of a sentiment experiment with this
    run's tokenizer and model (`_source_experiment`). Its "pretrain" stage is shared by every
    sentiment experiment; any other stage it holds is adopted only from a run of EXPERIMENT itself
    (a sentiment_classify run's "sft" is not sentiment_rlhf's "sft").
    """
    from rlft.config import format_override

    if not config.get("init_from"):
        return
    stages = list(config.init_stages)
    unknown = set(stages) - set(adoptable)
    if unknown:
        raise RlftError(f"init_stages={stages}: {sorted(unknown)} cannot be copied "
                        f"(choose from {list(adoptable)})")
    theirs = _source_experiment(config, experiment)
    src = config.init_from
    if theirs != experiment:
        foreign = [s for s in stages if s != SHARED_STAGE and os.path.isdir(os.path.join(src, s))]
        if foreign:
            raise RlftError(f"init_from={src}: a run of {theirs}, whose stages {foreign} were trained for that "
                            f"experiment; {experiment} shares only its {SHARED_STAGE!r} stage "
                            f"({format_override('init_stages', (SHARED_STAGE,))})")


def pretrained_base(config: ml_collections.ConfigDict, workdir: str) -> Base:
    """`base_from_run(config.init_from, config.init_stage)` if init_from is set, else `pretrain_base`."""
    if config.get("init_from"):
        return base_from_run(config.init_from, config.init_stage, workdir, dict(config.mesh))
    return pretrain_base(config, workdir)


def finished_stage(stage_dir: str, mesh: Mesh):
    """`rlft.load(STAGE_DIR)` with its params placed on `mesh` by the sharding rules: the newest
    finished checkpoint of the stage (what `evaluate` reads, also while the run is still training).
    RlftError naming the stage directory if it has no finished checkpoint yet."""
    import jax

    import rlft
    from rlft.train.checkpoints import checkpoint_steps
    from rlft.parallel.sharding import state_shardings

    if not checkpoint_steps(stage_dir):
        raise RlftError(f"rlft eval: {stage_dir} has no finished checkpoint yet")
    model = rlft.load(stage_dir)
    model.params = jax.device_put(model.params, state_shardings(model.params, mesh))
    return model


def vader_compound(texts: Sequence[str]) -> np.ndarray:
    """float64 [len(texts)]: the VADER lexicon judge's compound score in [-1, 1] of each text."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    judge = SentimentIntensityAnalyzer()
    return np.array([judge.polarity_scores(t)["compound"] for t in texts], np.float64)


def continuation(text: str, prompt_words: int) -> tuple[str, str] | None:
    """(prompt, completion) of a sentence: its first `prompt_words` words and the rest (with its
    leading space, as byte-level BPE tokenises a continuing word); None when nothing is left."""
    words = text.split()
    if len(words) <= prompt_words:
        return None
    prompt = " ".join(words[:prompt_words])
    return prompt, " " + " ".join(words[prompt_words:])


def continuation_records(tokenizer, rows: Sequence[dict], prompt_words: int) -> list[dict]:
    """Prompt records {"ids": [EOS] + prompt ids, "text", "completion", "rating"} of the sentences
    with a continuation, in row order (RL and evaluation prompts; SFT examples)."""
    out = []
    for r in rows:
        split = continuation(r["text"], prompt_words)
        if split is not None:
            prompt, completion = split
            ids = [tokenizer.eos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
            out.append({"ids": ids, "text": prompt, "completion": completion, "rating": r["rating"]})
    return out


def pairs_of_sources(data: ml_collections.ConfigDict, sources: Sequence[str], split: str) -> list:
    """Human-rating preference pairs of `split` from each corpus in `sources` (`data` read per corpus)."""
    from rlft.data.preferences import load_pairs

    pairs = []
    for source in sources:
        section = ml_collections.ConfigDict(data.to_dict())
        section.source = source
        pairs += load_pairs(section, split)
    return pairs


def judge_table(score_texts, data: ml_collections.ConfigDict, sources: Sequence[str],
                max_pairs: int = 0, max_sentences: int = 0) -> dict[str, dict]:
    """Per corpus (test split): a scorer's pairwise accuracy and Pearson r with the human ratings,
    beside VADER's. `score_texts(texts) -> [n]` scores whole sentences.

    Pairs are built like the training pairs (ratings differing by >= data.min_gap); VADER ties
    count ½ in its pairwise accuracy (the scorer's real-valued scores practically never tie).
    """
    table = {}
    for source in sources:
        pairs = pairs_of_sources(data, [source], "test")[:max_pairs or None]
        sentences = load_split(source, "test", data.data_dir or None)[:max_sentences or None]
        chosen = score_texts([p.chosen for p in pairs])
        rejected = score_texts([p.rejected for p in pairs])
        vader_c, vader_r = vader_compound([p.chosen for p in pairs]), vader_compound([p.rejected for p in pairs])
        ratings = np.array([r["rating"] for r in sentences], np.float64)
        texts = [r["text"] for r in sentences]
        table[source] = {
            "pairs": len(pairs), "sentences": len(sentences),
            "model_pairwise_accuracy": float(np.mean(chosen > rejected)),
            "vader_pairwise_accuracy": float(np.mean((vader_c > vader_r) + 0.5 * (vader_c == vader_r))),
            "model_pearson": pearson(score_texts(texts), ratings),
            "vader_pearson": pearson(vader_compound(texts), ratings),
        }
    return table


def judge_table_markdown(table: dict[str, dict], model: str) -> str:
    """The per-corpus table of `judge_table`, with where the model beats VADER and where not."""
    lines = [f"| corpus (test) | pairs | {model} pairwise | VADER pairwise (ties ½) | {model} Pearson r "
             "| VADER Pearson r | beats VADER on |", "|---|---|---|---|---|---|---|"]
    for source, r in table.items():
        wins = [name for name, ok in (("pairs", r["model_pairwise_accuracy"] > r["vader_pairwise_accuracy"]),
                                      ("Pearson", r["model_pearson"] > r["vader_pearson"])) if ok]
        lines.append(f"| {source} | {r['pairs']} | {r['model_pairwise_accuracy']:.3f} | "
                     f"{r['vader_pairwise_accuracy']:.3f} | {r['model_pearson']:.3f} | {r['vader_pearson']:.3f} "
                     f"| {', '.join(wins) or 'neither'} |")
    return "\n".join(lines) + "\n"


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two [n] arrays (nan if either is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def adopt_stages(run_dir: str, workdir: str, stages: Sequence[str]) -> list[str]:
    """Copy the tokenizer, model config and the given stage directories of an earlier run into WORKDIR
    (those WORKDIR lacks), so that its stages resume from them; returns the stages copied.

    The source is not judged here: `check_adopted_stages` refuses an incompatible one before
    anything is written (the experiment calls it first).
    """
    import shutil

    from rlft.train.checkpoints import MODEL_CONFIG_FILE
    from rlft.train.stages import read_stages, record_stage

    if not os.path.isfile(os.path.join(run_dir, MODEL_CONFIG_FILE)):
        raise RlftError(f"init_from={run_dir}: not an rlft run directory (no {MODEL_CONFIG_FILE})")
    if os.path.abspath(run_dir) == os.path.abspath(workdir):
        raise RlftError(f"init_from={run_dir}: that is this run's own directory")
    os.makedirs(workdir, exist_ok=True)
    if not os.path.isdir(os.path.join(workdir, "tokenizer")):
        shutil.copytree(os.path.join(run_dir, "tokenizer"), os.path.join(workdir, "tokenizer"))
        shutil.copy(os.path.join(run_dir, MODEL_CONFIG_FILE), workdir)
    kinds = {s["name"]: s["kind"] for s in read_stages(run_dir)}
    copied = []
    for stage in stages:
        source, target = os.path.join(run_dir, stage), os.path.join(workdir, stage)
        if os.path.isdir(source) and not os.path.exists(target):
            # Not a source's unfinished (a run still writing) or set-aside damaged checkpoints.
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(
                "tensorboard", "*.orbax-checkpoint-tmp*", "*.damaged-*"))
            record_stage(workdir, stage, kinds.get(stage, "lm"))
            copied.append(stage)
    return copied

"""Hugging Face sequence-classification reward models (GPT2/Llama/Qwen2ForSequenceClassification,
num_labels=1) imported as rlft ScalarModels: the score at the last real token equals the PyTorch
model's logits[:, 0] on token batches, through `rlft.load(dir).score(texts)` (framed as
`tokenizer(texts)`: Llama's BOS, no EOS), and as an RL reward scored from a rollout's token ids."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import rlft
from rlft.data.tokenizer import train_tokenizer
from rlft.errors import RlftError
from rlft.generate.sampling import Sequences
from rlft.models import ScalarModel, hf
from rlft.models.decoder import positions_from_mask
from rlft.models.heads import last_token_scores
from rlft.parallel.sharding import make_mesh
from rlft.rl.reward_model import load_reward_model
from rlft.rl.reward_step import make_rollout_scorer
from rlft.train.warm_start import load_values
from tests.conftest import save_random_hf_model, tiny_hf_configs

FAMILIES = ("gpt2", "llama", "qwen2")
CLASSES = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
           "qwen2": "Qwen2ForSequenceClassification"}
VOCAB = 300  # the model's; the tokenizer's 281 tokens (+ Llama's BOS) fit
EOS, PAD = 0, 1  # `train_tokenizer`'s ids
CORPUS = [f"the film was {w} and {w}." for w in ("good", "bad", "long")] * 5
TEXTS = ["the film was good", "bad", "the film was long and bad.", "good and good and good film"]


def _seqcls_config(name: str, num_labels: int = 1):
    """The shared tiny config of `name` (tests/conftest.py) as a reward model with our vocabulary:
    num_labels labels, the pad id in the config (so transformers finds each row's last token)."""
    config, _ = tiny_hf_configs()[name]
    config.vocab_size, config.num_labels = VOCAB, num_labels
    config.pad_token_id, config.eos_token_id = PAD, EOS
    return config, getattr(transformers, CLASSES[name])


def _save_tokenizer(name: str, path: str):
    """A byte-level BPE saved beside the checkpoint; Llama's adds a BOS `<s>` to every text, as
    Llama tokenizers do (a template post-processor), GPT-2's and Qwen2's add nothing."""
    from tokenizers import processors

    tok = train_tokenizer(CORPUS, 300, path)
    if name != "llama":
        return tok
    backend = tok.backend_tokenizer
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                               eos_token=tok.eos_token, pad_token=tok.pad_token)
    tok.save_pretrained(path)
    return tok


@pytest.fixture(scope="module")
def reward_checkpoints(tmp_path_factory):
    """{family: (dir, torch model, tokenizer)}: random tiny reward models saved with save_pretrained,
    the score head scaled up (HF initialises it at std 0.02) so that a wrong read-out shows."""
    torch.manual_seed(0)
    out = {}
    for name in FAMILIES:
        path = str(tmp_path_factory.mktemp(f"{name}_reward"))
        tok = _save_tokenizer(name, path)
        config, cls = _seqcls_config(name)
        config.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else EOS
        model = save_random_hf_model(config, cls, path)
        with torch.no_grad():
            model.score.weight.normal_()
        model.save_pretrained(path)
        out[name] = (path, model, tok)
    return out


def _hf_scores(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The transformers model's logits[:, 0] of right-padded ids (its default positions)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()


def _right_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids, mask = np.full((len(rows), width), PAD, np.int64), np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


@pytest.mark.parametrize("name", FAMILIES)
def test_scores_at_the_last_real_token_match_pytorch(reward_checkpoints, name):
    """Right-padded token batches of different lengths: rlft's ScalarModel == logits[:, 0]. The
    backbone holds no LM head (tied: the checkpoint has none)."""
    path, torch_model, _ = reward_checkpoints[name]
    cfg, params = hf.load_hf_scalar_checkpoint(path)
    assert cfg.tie_embeddings and "lm_head" not in params["backbone"]
    rng = np.random.RandomState(0)
    ids, mask = _right_padded([list(rng.randint(2, VOCAB, size=n)) for n in (12, 7, 1, 10)])
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ScalarModel(cfg, rngs=nnx.Rngs(0))))
    segments = jnp.asarray(mask, jnp.int32)
    ours = last_token_scores(nnx.merge(graphdef, params)(jnp.asarray(ids, jnp.int32), positions_from_mask(segments),
                                                          segments), segments)
    ref = _hf_scores(torch_model, ids, mask)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    assert np.ptp(ref) > 0.1  # rows score differently: a read-out at the wrong token would show


@pytest.mark.parametrize("name", FAMILIES)
def test_load_scores_texts_like_transformers(reward_checkpoints, name):
    """`rlft.load(dir)` is a scalar model whose framing is the tokenizer's own (Llama: its BOS id;
    no EOS; no mean/std), and score(texts) == logits of tokenizer(texts, padding=True)."""
    path, torch_model, tok = reward_checkpoints[name]
    model = rlft.load(path)
    framing = {"add_bos": name == "llama", "add_eos": False, "max_length": 64}
    if name == "llama":
        framing["bos_id"] = tok.bos_token_id
    assert model.kind == "scalar" and model.reward_stats == framing
    encoded = tok(TEXTS, padding=True)
    ref = _hf_scores(torch_model, np.asarray(encoded["input_ids"]), np.asarray(encoded["attention_mask"]))
    np.testing.assert_allclose(model.score(TEXTS, batch_size=3), ref, atol=1e-4, rtol=0)


# (prompt, completion, ended with EOS); "^" opens the prompt with BOS (Llama only: a policy's own BOS).
ROWS = [("the film", " was good", True), ("^bad", " and bad.", False), ("good", "", True),
        ("the", " film was long", False)]
PROMPT_WIDTH, NEW = 5, 6


def _rollout(tok) -> tuple[Sequences, list[tuple[list[int], list[int]]]]:
    """ROWS in the sampler's layout (left-padded prompts, completions up to and including EOS,
    padding after), and each row's (prompt ids, completion ids)."""
    tokens = np.full((len(ROWS), PROMPT_WIDTH + NEW), PAD, np.int32)
    segments = np.zeros_like(tokens)
    rows = []
    for i, (prompt, completion, ended) in enumerate(ROWS):
        bos = [tok.bos_token_id] if prompt.startswith("^") and tok.bos_token_id is not None else []
        p = bos + tok.encode(prompt.lstrip("^"), add_special_tokens=False)
        c = tok.encode(completion, add_special_tokens=False) + ([EOS] if ended else [])
        assert len(p) <= PROMPT_WIDTH and len(c) <= NEW
        tokens[i, PROMPT_WIDTH - len(p):PROMPT_WIDTH] = p
        tokens[i, PROMPT_WIDTH:PROMPT_WIDTH + len(c)] = c
        segments[i, PROMPT_WIDTH - len(p):PROMPT_WIDTH + len(c)] = 1
        rows.append((p, c))
    mask = segments[:, PROMPT_WIDTH:].astype(np.float32)
    seqs = Sequences(tokens=jnp.asarray(tokens), positions=positions_from_mask(jnp.asarray(segments)),
                     segment_ids=jnp.asarray(segments), completion_mask=jnp.asarray(mask),
                     logprobs=jnp.zeros(mask.shape, jnp.float32))
    return seqs, rows


@pytest.mark.parametrize("name", FAMILIES)
def test_an_hf_reward_model_scores_a_rollout_like_transformers(reward_checkpoints, name):
    """load_reward_model(dir) (not normalised: no mean/std recorded) through the RL scorer on a
    rollout's token ids == the HF logits of prompt ids (+ BOS for Llama, unless the prompt opens
    with it) + completion ids; normalize=True is a clear error."""
    path, torch_model, tok = reward_checkpoints[name]
    reward = load_reward_model(path)
    assert not reward.normalize and reward.shares_vocabulary(tok)  # the token-id path
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    score = make_rollout_scorer(reward, tokenizer=tok, prompts=[{"text": p} for p, _, _ in ROWS], mesh=mesh)
    seqs, rows = _rollout(tok)
    seqs = jax.device_put(seqs, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    got = np.asarray(score(seqs, np.arange(len(ROWS)), lambda: "rl step 1")[0])  # (scores, metrics)
    bos = tok.bos_token_id if name == "llama" else None
    framed = [([bos] if bos is not None and p[0] != bos else []) + p + c for p, c in rows]
    np.testing.assert_allclose(got, _hf_scores(torch_model, *_right_padded(framed)), atol=1e-4, rtol=0)
    with pytest.raises(RlftError, match="normalize=True needs a reference mean and std"):
        load_reward_model(path, normalize=True)
    with pytest.raises(RlftError, match=r"score\(normalize=True\): this model has no reward_stats.json"):
        rlft.load(path).score(["a b"], normalize=True)


def test_two_labels_a_missing_head_and_the_lm_loader_are_clear_errors(reward_checkpoints, tmp_path):
    """num_labels=2 names config.json; a checkpoint without score.weight names the tensor;
    load_hf_checkpoint points at the scalar loader; load_values gives a ScalarModel's values."""
    from safetensors.numpy import save_file

    config, cls = _seqcls_config("gpt2", num_labels=2)
    cls(config).save_pretrained(tmp_path / "two")
    with pytest.raises(RlftError, match=r"config.json: num_labels=2; rlft imports sequence-classification"):
        rlft.load(str(tmp_path / "two"))

    path, _, _ = reward_checkpoints["qwen2"]
    (tmp_path / "headless").mkdir()
    shutil.copy(f"{path}/config.json", tmp_path / "headless")
    tensors = hf.read_safetensors(path)
    del tensors["score.weight"]
    save_file(tensors, str(tmp_path / "headless" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RlftError, match="tensor score.weight is missing"):
        rlft.load(str(tmp_path / "headless"))

    with pytest.raises(RlftError, match="load_hf_scalar_checkpoint"):
        hf.load_hf_checkpoint(path)
    values = load_values(path)
    assert sorted(values) == ["backbone", "head"] and values["head"]["kernel"].shape == (32,)
    assert json.load(open(f"{path}/config.json"))["architectures"] == ["Qwen2ForSequenceClassification"]

"""rlft's Flax models against the PyTorch models in transformers: import, export, left padding."""

import json

import numpy as np
import pytest
import torch

import rlft
from rlft.errors import RlftError
from tests.conftest import tiny_hf_configs

FAMILIES = list(tiny_hf_configs())


def _inputs(left_pad: bool):
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 96, size=(3, 12))
    mask = np.ones_like(ids)
    if left_pad:
        mask[1, :4] = 0
        mask[2, :9] = 0
        ids[mask == 0] = 1  # pad ids must not matter
    return ids, mask


def _torch_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("left_pad", [False, True])
def test_logits_match_pytorch(hf_checkpoints, name, left_pad):
    path, torch_model = hf_checkpoints[name]
    ids, mask = _inputs(left_pad)
    ours = rlft.load(path).logits(ids, mask)
    ref = _torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padding_does_not_change_logits(hf_checkpoints, name):
    path, _ = hf_checkpoints[name]
    model = rlft.load(path)
    ids, mask = _inputs(left_pad=True)
    padded = model.logits(ids, mask)
    for row in range(ids.shape[0]):
        real = mask[row].astype(bool)
        alone = model.logits(ids[row:row + 1, real])[0]
        np.testing.assert_allclose(padded[row, real], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_export_roundtrip_loads_in_transformers(hf_checkpoints, name, tmp_path):
    import transformers

    from rlft.cli.main import main

    path, _ = hf_checkpoints[name]
    assert main(["export", path, "--out", str(tmp_path / "out")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = _inputs(left_pad=True)
    ours = rlft.load(path).logits(ids, mask)
    np.testing.assert_allclose(_torch_logits(reloaded, ids, mask)[mask == 1], ours[mask == 1],
                               atol=1e-4, rtol=0)
    assert type(reloaded).__name__ == json.load(open(tmp_path / "out" / "config.json"))["architectures"][0]


def test_sharded_safetensors_index(hf_checkpoints, tmp_path):
    _, torch_model = hf_checkpoints["llama"]
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids, mask = _inputs(left_pad=True)
    np.testing.assert_allclose(rlft.load(str(tmp_path)).logits(ids, mask)[mask == 1],
                               _torch_logits(torch_model, ids, mask)[mask == 1], atol=1e-4, rtol=0)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(RlftError, match=r"model_type 'bert' is not supported; rlft imports gpt2, llama, qwen2"):
        rlft.load(str(tmp_path))


def test_missing_weights_is_a_clear_error(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints["gpt2"]
    (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
    with pytest.raises(RlftError, match="no model.safetensors or model.safetensors.index.json"):
        rlft.load(str(tmp_path))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(RlftError, match="no such file or directory"):
        rlft.load(str(tmp_path / "nope"))

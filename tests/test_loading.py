"""Safe adapter loading: clear errors for broken folders, pickles and mismatched bases; Hub ids take the same path."""

import shutil

import pytest
import torch
from _share_helpers import L, load_base, make_adapter, make_base
from peft import get_peft_model

from pi_peft import PIConfig
from pi_peft.sharing.loading import check_adapter_dir, load_adapter, read_safetensors_header, resolve_adapter_dir
from pi_peft.testing import tiny_model


@pytest.fixture(scope="module")
def share(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    base_dir = make_base(root / "base")
    model = make_adapter(base_dir, root / "adapter")
    x = torch.randint(0, 128, (1, 3 * L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    return {"root": root, "base": base_dir, "adapter": root / "adapter", "x": x, "ref": ref}


def _copy(share, tmp_path):
    dst = tmp_path / "adapter"
    shutil.copytree(share["adapter"], dst)
    return dst


def _logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


def test_load_adapter_reproduces_the_saved_model(share):
    model = load_adapter(share["adapter"])  # base from adapter_config.json's base_model_name_or_path
    assert model.config.rope_parameters["factor"] == 4.0
    torch.testing.assert_close(_logits(model, share["x"]), share["ref"])


def test_missing_config(share, tmp_path):
    folder = _copy(share, tmp_path)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"no `adapter_config.json` \(it has: \['README.md', 'adapter_model"):
        load_adapter(folder, share["base"])


def test_missing_weights(share, tmp_path):
    folder = _copy(share, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no weights: expected `adapter_model.safetensors`"):
        load_adapter(folder, share["base"])


def test_config_not_json(share, tmp_path):
    folder = _copy(share, tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"`adapter_config.json` in .* is not valid JSON"):
        check_adapter_dir(folder)


def test_truncated_safetensors(share, tmp_path):
    folder = _copy(share, tmp_path)
    file = folder / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"`adapter_model.safetensors` .* corrupt \(.*not fully covered"):
        load_adapter(folder, share["base"])


@pytest.mark.parametrize("garbage", [b"\x00" * 4, b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00not-json-at-all!"])
def test_corrupt_safetensors(share, tmp_path, garbage):
    folder = _copy(share, tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(garbage)
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        check_adapter_dir(folder)


def test_intact_safetensors_header_is_read(share):
    header = read_safetensors_header(share["adapter"] / "adapter_model.safetensors")
    assert header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]["shape"] == [8, 64]


def test_pickle_refused_unless_opted_in(share, tmp_path):
    folder = _copy(share, tmp_path)
    from safetensors.torch import load_file

    state = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state, folder / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"pickle \(`adapter_model.bin`\).*`allow_pickle=True`"):
        load_adapter(folder, share["base"])
    model = load_adapter(folder, share["base"], allow_pickle=True)
    torch.testing.assert_close(_logits(model, share["x"]), share["ref"])


def test_base_of_other_size(share):
    other = load_base(share["base"])
    smaller = type(other)(type(other.config)(**{**other.config.to_dict(), "hidden_size": 32, "head_dim": 8}))
    with pytest.raises(
        ValueError, match=r"does not fit the base model LlamaForCausalLM \(hidden_size=32.*_features=32 here but 64"
    ):
        load_adapter(share["adapter"], smaller)


def test_base_with_fewer_layers(share):
    other = load_base(share["base"])
    shallow = type(other)(type(other.config)(**{**other.config.to_dict(), "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"it adapts module `model.layers.1.mlp.down_proj`.*trained on"):
        load_adapter(share["adapter"], shallow)


def test_base_of_other_architecture(share):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300
        )
    )
    with pytest.raises(ValueError, match=r"does not fit the base model GPTNeoXForCausalLM.*which this base does not"):
        load_adapter(share["adapter"], neox)


def test_other_vocab_size_caught_for_trained_embeddings(share, tmp_path):
    make_adapter(share["base"], tmp_path / "emb", train_embeddings=True)
    other = load_base(share["base"])
    bigger = type(other)(type(other.config)(**{**other.config.to_dict(), "vocab_size": 512}))
    trained = rf"\({other.config.vocab_size}, 64\)"
    with pytest.raises(ValueError, match=rf"`model.embed_tokens.weight` has shape \(512, 64\) here but {trained}"):
        load_adapter(tmp_path / "emb", bigger)


def test_no_recorded_base(share, tmp_path):
    import json

    folder = _copy(share, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`base_model_name_or_path` is empty.*`base=`"):
        load_adapter(folder)


def test_hub_id_goes_through_snapshot_download(share, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(share["adapter"])  # what the real one returns: a local snapshot folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_adapter("someone/tiny-pi", share["base"], revision="v1")
    assert calls[0][0] == "someone/tiny-pi" and calls[0][1]["revision"] == "v1"
    torch.testing.assert_close(_logits(model, share["x"]), share["ref"])


def test_hub_id_offline_and_uncached_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not in the local Hub cache.*HF_HUB_OFFLINE"):
        resolve_adapter_dir("pi-peft-tests/definitely-not-cached")


def test_file_instead_of_folder(share):
    with pytest.raises(ValueError, match=r"is a file; pass the adapter \*folder\*"):
        resolve_adapter_dir(share["adapter"] / "adapter_config.json")


def test_adapter_onto_a_deeper_base_is_a_clear_error(tmp_path):
    config = PIConfig(scaling_factor=4.0, target_modules=["q_proj"], train_norms=True)
    get_peft_model(tiny_model(), config).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"this base has `model\.layers\.2\..*no weights for \(more layers\?\)"):
        load_adapter(tmp_path / "a", tiny_model(num_hidden_layers=3))
    load_adapter(tmp_path / "a", tiny_model())  # the right base still loads

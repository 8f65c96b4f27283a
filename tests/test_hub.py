"""`pi-peft push` / `model.push_to_hub`, offline: `HfApi.create_repo`/`create_branch`/`create_commit` intercepted."""

import json

import pytest
from _share_helpers import BASE_LICENSE, L, load_base, make_adapter, make_base
from huggingface_hub import HfApi, ModelCard, constants

import pi_peft.sharing.hub as hub
from pi_peft.cli import main as pi_peft_main
from pi_peft.cli.push import cli_main as push_cli
from pi_peft.sharing.serving import extension_of, llama_cpp_rope_flags, llama_cpp_unsupported_note

TOKEN = "hf_pipeftTestSentinelToken0123456789"
PASSKEY_MD = "| length | accuracy |\n|---|---|\n| 64 | 1.00 |\n| 256 | 0.80 |"
PPL_MD = "| length | base | adapter |\n|---|---|---|\n| 256 | 812.4 | 9.1 |"


class FakeHub:
    """Records what would be sent to the Hub."""

    def __init__(self):
        self.calls = []
        self.files = {}

    def install(self, monkeypatch):
        test = self

        class RepoUrl(str):
            repo_id = "me/tiny-pi"

        def create_repo(self, repo_id, **kwargs):
            test.calls.append(("create_repo", repo_id, kwargs))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, **kwargs):
            test.calls.append(("create_branch", repo_id, kwargs))

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                with open(op.path_or_fileobj, "rb") as f:
                    test.files[op.path_in_repo] = f.read()
            test.calls.append(("create_commit", repo_id, kwargs))
            return "commit-info"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self

    def call(self, name):
        return next(c for c in self.calls if c[0] == name)

    def card(self):
        return ModelCard(self.files["README.md"].decode())


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return FakeHub().install(monkeypatch)


@pytest.fixture(scope="module")
def share(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    base_dir = make_base(root / "base")
    make_adapter(base_dir, root / "adapter")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # trainers save the tokenizer next to the adapter
        (root / "adapter" / name).write_bytes((root / "base" / name).read_bytes())
    state = {"global_step": 1000, "num_train_epochs": 1, "log_history": [{"loss": 2.5}, {"loss": 1.75}]}
    (root / "adapter" / "trainer_state.json").write_text(json.dumps(state))
    eval_dir = root / "eval"
    eval_dir.mkdir()
    (eval_dir / "passkey.md").write_text(PASSKEY_MD)
    (eval_dir / "ppl.md").write_text(PPL_MD)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    (eval_dir / "passkey.png").write_bytes(png)
    (eval_dir / "ppl.png").write_bytes(png[::-1])
    return {"root": root, "base": base_dir, "adapter": root / "adapter", "eval": eval_dir}


def test_push_folder_uploads_adapter_card_and_plots(share, online):
    hub.push_adapter(
        share["adapter"], "me/tiny-pi", eval_dir=share["eval"], private=True, revision="dev", commit_message="v1"
    )
    assert online.call("create_repo")[2]["private"] is True
    assert online.call("create_branch")[2]["branch"] == "dev"
    commit = online.call("create_commit")
    assert commit[1] == "me/tiny-pi" and commit[2]["revision"] == "dev" and commit[2]["commit_message"] == "v1"
    assert set(online.files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "eval/passkey.png",
        "eval/ppl.png",
    }
    assert online.files["adapter_model.safetensors"] == (share["adapter"] / "adapter_model.safetensors").read_bytes()
    assert online.files["eval/passkey.png"] == (share["eval"] / "passkey.png").read_bytes()
    assert json.loads(online.files["adapter_config.json"])["peft_type"] == "PI"


def test_card_metadata(share, online):
    hub.push_adapter(share["adapter"], "me/tiny-pi", eval_dir=share["eval"])
    data = online.card().data
    assert data.base_model == share["base"]
    assert data.library_name == "peft"
    assert data.pipeline_tag == "text-generation"
    assert data.license == BASE_LICENSE  # read from the base model's card
    assert set(data.tags) == {"pi-peft", "position-interpolation", "long-context", "lora"}


def test_card_body(share, online):
    hub.push_adapter(share["adapter"], "me/tiny-pi", eval_dir=share["eval"])
    text = online.card().text
    assert f"from **{L}** to **{4 * L}** tokens" in text
    assert "| scaling factor `s` | 4 |" in text and "| RoPE type | `linear` |" in text
    assert "pip install pi-peft" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-pi")' in text
    assert "KeyError: 'PI'" in text  # what happens without pi_peft (checked for real in test_export.py)
    assert "pi-peft export merged me/tiny-pi" in text and "pi-peft export lora me/tiny-pi" in text
    assert f"--max-model-len {4 * L}" in text and "--rope-scaling linear --rope-scale 4" in text
    assert "no flags to remember" not in text and "silently" not in text  # vLLM needs --max-model-len; refuses
    assert f"vllm serve ./tiny-pi-merged --max-model-len {4 * L}" in text
    assert f"without the flag it would accept {16 * L:,}-token prompts" in text  # max_position_embeddings x factor
    assert f"vLLM refuses a `--max-model-len` above the base's {L}-token window" in text
    assert "--lora-modules pi=./tiny-pi-lora" in text and "--max-lora-rank 8" in text
    assert "| optimizer steps | 1000 |" in text and "| final training loss | 1.75 |" in text
    assert "| method | LoRA |" in text  # a folder does not record whether the base was 4-bit
    assert PASSKEY_MD in text and PPL_MD in text
    assert "![passkey](eval/passkey.png)" in text and "![ppl](eval/ppl.png)" in text


def test_model_push_to_hub_uploads_generated_card(share, online):
    model = make_adapter(share["base"], share["root"] / "unused")
    model.push_to_hub("me/tiny-pi", private=False, commit_message="from model", revision="refs/pr/1")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(online.files)
    assert online.call("create_commit")[2]["commit_message"] == "from model"
    assert [c[0] for c in online.calls] == ["create_repo", "create_commit"]  # no branch creation for refs/pr
    card = online.card()
    assert "pi-peft" in card.data.tags and "lora" in card.data.tags
    assert "## Context extension" in card.text and "| method | LoRA (unquantised base) |" in card.text


def test_qlora_model_is_tagged_qlora(share, online):
    from transformers import BitsAndBytesConfig

    quantized = load_base(share["base"], quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model = make_adapter(share["base"], share["root"] / "q", base_model=quantized)
    model.push_to_hub("me/tiny-pi", tags=["extra"])
    card = online.card()
    assert "qlora" in card.data.tags and "lora" not in card.data.tags and "extra" in card.data.tags
    assert "QLoRA (4-bit base, bitsandbytes)" in card.text


def test_token_never_printed_or_written(share, online, capsys):
    assert push_cli([str(share["adapter"]), "me/tiny-pi", "--eval-dir", str(share["eval"])]) == 0
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    assert all(TOKEN.encode() not in content for content in online.files.values())


def test_offline_push_is_a_clear_error(share, monkeypatch, capsys):
    from huggingface_hub.errors import OfflineModeIsEnabled

    hub_calls = FakeHub().install(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineModeIsEnabled, match=r"Cannot push to 'me/tiny-pi'.*HF_HUB_OFFLINE=1.*Unset"):
        hub.push_adapter(share["adapter"], "me/tiny-pi")
    assert pi_peft_main(["push", str(share["adapter"]), "me/tiny-pi"]) == 2
    assert "offline mode" in capsys.readouterr().err
    assert hub_calls.calls == []


def test_bad_inputs(share, online, tmp_path):
    with pytest.raises(ValueError, match=r"`repo_id` must be a Hub repo name"):
        hub.push_adapter(share["adapter"], "")
    with pytest.raises(ValueError, match=r"`eval_dir`=.* holds none of \['passkey.md'"):
        hub.push_adapter(share["adapter"], "me/tiny-pi", eval_dir=tmp_path)
    lora_dir = tmp_path / "lora"
    from pi_peft.sharing.export import export_lora

    export_lora(share["adapter"], lora_dir)
    with pytest.raises(ValueError, match=r"`peft_type` is 'LORA', not 'PI'"):
        hub.push_adapter(lora_dir, "me/tiny-pi")
    assert online.calls == []  # nothing reached the Hub


def test_plain_lora_model_keeps_peft_push_to_hub(monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled
    from peft import LoraConfig, get_peft_model

    from pi_peft.testing import tiny_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    called = []
    monkeypatch.setattr(hub, "push_to_hub", lambda *a, **k: called.append(a))
    with pytest.raises(OfflineModeIsEnabled):  # peft's own path, which needs the network (offline in tests)
        model.push_to_hub("me/plain-lora")
    assert called == []


def test_card_for_longlora_adapter_has_no_plain_lora_route(share, online, tmp_path):
    make_adapter(share["base"], tmp_path / "emb", train_embeddings=True)
    hub.push_adapter(tmp_path / "emb", "me/tiny-pi")
    text = online.card().text
    assert "**Plain LoRA**: not possible for this adapter" in text and "--hf-overrides" not in text


@pytest.mark.parametrize(
    ("rope_type", "extra", "expected"),
    [
        ("linear", {}, f"--rope-scaling linear --rope-scale 4 -c {4 * L}"),
        ("yarn", {"beta_fast": 16.0}, f"--rope-scaling yarn --rope-scale 4 --yarn-orig-ctx {L} --yarn-beta-fast 16"),
        ("dynamic", {}, None),
    ],
)
def test_llama_cpp_flags(rope_type, extra, expected):
    config = {
        "peft_type": "PI",
        "rope_type": rope_type,
        "original_context_length": L,
        "context_length": 4 * L,
        "scaling_factor": 4.0,
        "base_rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        **extra,
    }
    flags = llama_cpp_rope_flags(extension_of(config))
    if expected is None:
        assert "does not implement dynamic NTK" in llama_cpp_unsupported_note(extension_of(config))
    assert flags == expected if expected is None else flags.startswith(expected)


def test_extension_of_rejects_incomplete_config():
    with pytest.raises(ValueError, match=r"lacks \['original_context_length'"):
        extension_of({"peft_type": "PI", "context_length": 256})


def test_cli_push_options(share, online):
    args = [str(share["adapter"]), "me/tiny-pi", "--private", "--revision", "dev", "--commit-message", "msg"]
    assert push_cli(args + ["--license", "mit", "--qlora"]) == 0
    assert online.call("create_repo")[2]["private"] is True
    assert online.call("create_commit")[2]["commit_message"] == "msg"
    assert online.card().data.license == "mit" and "qlora" in online.card().data.tags

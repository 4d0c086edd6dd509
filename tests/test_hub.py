"""`peft_abmll.hub.push_to_hub` with the Hub calls replaced by recorders (nothing leaves the machine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _models import tiny_llama
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file

from peft_abmll import ABMLLConfig
from peft_abmll.hub import push_to_hub, write_model_card


class FakeHub:
    """Records the `HfApi` calls push_to_hub makes and what the uploaded folder held at upload time."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.files: dict[str, bytes] = {}

    def create_repo(self, api: HfApi, repo_id: str, **kwargs: Any) -> RepoUrl:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, api: HfApi, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, api: HfApi, **kwargs: Any) -> CommitInfo:
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123",
            commit_message="x",
            commit_description="",
            oid="abc123",
        )

    def card(self) -> tuple[dict[str, Any], str]:
        text = self.files["README.md"].decode()
        _, front_matter, body = text.split("---\n", 2)
        return yaml.safe_load(front_matter), body


@pytest.fixture(name="model")
def _model() -> PeftModel:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), ABMLLConfig(r=4, lora_alpha=8, beta=1e-6, task_type=TaskType.CAUSAL_LM))
    model.peft_config["default"].base_model_name_or_path = "org/tiny-llama"
    return model


def _patch_recorder(fake: FakeHub, name: str) -> Any:
    method = getattr(FakeHub, name)
    return lambda api, *args, **kwargs: method(fake, api, *args, **kwargs)


@pytest.fixture(name="hub_calls")
def _hub_calls(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub()
    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, _patch_recorder(fake, name))
    return fake


@pytest.mark.filterwarnings("ignore:Could not find a config file")
def test_push_uploads_exactly_the_adapter_and_card(hub_calls: FakeHub, model: PeftModel) -> None:
    info = push_to_hub(model, "me/abmll-tiny", private=True, commit_message="first")
    assert isinstance(info, CommitInfo) and info.oid == "abc123"
    assert [name for name, _ in hub_calls.calls] == ["create_repo", "upload_folder"]
    create, upload = hub_calls.calls[0][1], hub_calls.calls[1][1]
    assert create["repo_id"] == "me/abmll-tiny" and create["private"] is True and create["exist_ok"] is True
    assert upload["repo_id"] == "me/abmll-tiny" and upload["commit_message"] == "first"
    assert upload["create_pr"] is False and upload["revision"] is None
    assert set(hub_calls.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert json.loads(hub_calls.files["adapter_config.json"])["peft_type"] == "ABMLL"


@pytest.mark.filterwarnings("ignore:Could not find a config file")
def test_pushed_weights_reload(hub_calls: FakeHub, model: PeftModel, tmp_path: Path) -> None:
    push_to_hub(model, "me/abmll-tiny")
    for name, content in hub_calls.files.items():
        (tmp_path / name).write_bytes(content)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert weights and all(".abmll_" in key for key in weights)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:Could not find a config file")
def test_card_contents(hub_calls: FakeHub, model: PeftModel) -> None:
    push_to_hub(model, "me/abmll-tiny")
    meta, body = hub_calls.card()
    assert meta["library_name"] == "peft"
    assert {"abmll", "peft", "lora", "bayesian", "meta-learning"} <= set(meta["tags"])
    assert meta["base_model"] == "org/tiny-llama" and meta["pipeline_tag"] == "text-generation"
    for row in (
        "| `r` | `4` |",
        "| `lora_alpha` | `8` |",
        "| `beta` | `1e-06` |",
        "| `scale_type` | `linear` |",
        "| `sampling` | `local` |",
        "| `init_std` | `0.001` |",
        "| `posterior` | `global` |",
        "| `target_modules` | `o_proj`, `q_proj`, `v_proj` |",
    ):
        assert row in body
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0]
    lines = snippet.splitlines()
    assert lines[0].startswith("import peft_abmll")
    assert any('PeftModel.from_pretrained(base, "me/abmll-tiny")' in line for line in lines)
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-llama")' in snippet
    assert "KeyError: 'ABMLL'" in body and "before" in body  # the sentence saying why the import comes first


@pytest.mark.filterwarnings("ignore:Could not find a config file")
def test_push_with_revision_and_pr(hub_calls: FakeHub, model: PeftModel) -> None:
    push_to_hub(model, "me/abmll-tiny", revision="v1", create_pr=True, token="hf_fake")
    assert [name for name, _ in hub_calls.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub_calls.calls[1][1]["branch"] == "v1" and hub_calls.calls[1][1]["exist_ok"] is True
    assert hub_calls.calls[2][1]["revision"] == "v1" and hub_calls.calls[2][1]["create_pr"] is True


def test_card_for_local_base_omits_base_model_metadata(model: PeftModel, tmp_path: Path) -> None:
    model.peft_config["default"].base_model_name_or_path = str(tmp_path)  # a local directory, not a Hub id
    text = write_model_card(model, tmp_path).read_text()
    meta = yaml.safe_load(text.split("---\n", 2)[1])
    assert "base_model" not in meta and meta["library_name"] == "peft"
    assert str(tmp_path) in text


def test_push_rejects_non_abmll_models(hub_calls: FakeHub) -> None:
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="ABMLL"):
        push_to_hub(lora, "me/lora")
    assert hub_calls.calls == []


def test_card_lists_every_abmll_adapter(model: PeftModel, tmp_path: Path) -> None:
    model.add_adapter("task", ABMLLConfig(r=2, sampling="weight", scale_type="softplus"))
    body = write_model_card(model, tmp_path, repo_id="me/x").read_text()
    assert "### Adapter `default`" in body and "### Adapter `task`" in body
    assert "| `r` | `2` |" in body and "| `scale_type` | `softplus` |" in body


# ----------------------------------------------------------------------------------------------- every save
def test_every_save_pretrained_writes_the_abmll_card(model: PeftModel, tmp_path: Path) -> None:
    """A folder saved by plain `save_pretrained` is ready to upload with the Hub's own tools."""
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "# ABMLL adapter" in card and "import peft_abmll" in card
    assert "[More Information Needed]" not in card  # PEFT's blank template is gone
    assert "No meta-training or evaluation was recorded" in card
    lora = get_peft_model(tiny_llama(), LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert "ABMLL" not in (tmp_path / "lora" / "README.md").read_text()  # other methods keep PEFT's card


def test_the_card_says_how_the_adapter_was_trained_and_what_it_scored(tmp_path: Path) -> None:
    from _tasks import task_family, tiny_lm, tiny_tokenizer

    from peft_abmll import MetaTrainer, MetaTrainingArguments

    tok = tiny_tokenizer()
    family = task_family(num_tasks=3, per_task=16, seed=0)
    model = get_peft_model(tiny_lm(tok), ABMLLConfig(task_type="CAUSAL_LM"))
    args = MetaTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        eval_max_query=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = MetaTrainer(model=model, args=args, train_dataset=family, eval_dataset=family, processing_class=tok)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(tmp_path / "adapter"))
    card = (tmp_path / "adapter" / "README.md").read_text()
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["training_record"]["meta_training"]["episodes"] == 2
    assert "Meta-trained with `peft_abmll.MetaTrainer`" in card and "| episodes | `2` |" in card
    assert "Held-out tasks (`t0`, `t1`, `t2`; 12 query examples" in card
    assert f"| macro | {metrics['eval_accuracy']:.3f} |" in card
    assert "pipeline_tag: text-generation" in card


def test_the_offline_smollm2_asset_records_its_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from _tasks import tiny_lm, tiny_tokenizer

    from peft_abmll import experiment
    from peft_abmll.assets import smollm2

    tok = tiny_tokenizer()
    tiny_lm(tok).save_pretrained(tmp_path / "cache-folder")
    tok.save_pretrained(tmp_path / "cache-folder")
    monkeypatch.setattr(experiment, "smollm2_path", lambda install=True: tmp_path / "cache-folder")
    model_fn, _ = experiment.load_causal_lm("smollm2")
    get_peft_model(model_fn(), ABMLLConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == smollm2.SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"base_model: {smollm2.SMOLLM2_HUB_ID}" in card


def test_a_failing_card_never_costs_the_save(model: PeftModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft_abmll import registration

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("card template broken")

    monkeypatch.setattr(registration, "write_model_card", broken)
    with pytest.warns(UserWarning, match="Could not write the ABMLL model card"):
        model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "README.md").is_file()  # PEFT's own card

"""Push an ABMLL adapter to the Hugging Face Hub with an ABMLL model card.

`PeftModel.push_to_hub` is transformers' mixin: it replaces PEFT's card with a ``library_name: transformers``
one, and says nothing about the plugin import every user needs. `push_to_hub` here saves the adapter, writes
our own card (`write_model_card`) and uploads the folder in one commit.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData
from peft import PeftModel

from .tuner.config import ABMLLConfig

__all__ = ["push_to_hub", "write_model_card"]

TAGS = ["abmll", "peft", "lora", "bayesian", "meta-learning", "uncertainty"]
PAPER = "https://arxiv.org/abs/2508.14285"
#: Key config values shown in the card, in order.
CARD_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "scale_type",
    "sampling",
    "beta",
    "kl_reduction",
    "init_std",
    "scale_floor",
    "posterior",
    "predictive_mode",
    "num_samples",
    "prior_a0",
    "prior_b0",
    "adaptation_learning_rate",
)
_PIPELINES: dict[Optional[str], tuple[Optional[str], str]] = {
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
}
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def push_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload ABMLL adapter",
    create_pr: bool = False,
    revision: Optional[str] = None,
) -> CommitInfo:
    """Save `model`'s adapters with an ABMLL model card and upload them to `repo_id` in one commit.

    Creates the repository if needed (and the `revision` branch, when given). Returns the `CommitInfo`.
    """
    _abmll_configs(model)  # fail before touching the Hub
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        write_model_card(model, folder, repo_id=repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


def write_model_card(model: PeftModel, folder: Union[str, os.PathLike], *, repo_id: Optional[str] = None) -> Path:
    """Write ``README.md`` in `folder`: PEFT metadata, the ABMLL config and a usage snippet. Returns its path.

    ``base_model`` goes into the metadata when the config's ``base_model_name_or_path`` is a Hub repo id (a
    local path is only mentioned in the text).
    """
    configs = _abmll_configs(model)
    main = configs.get(model.active_adapter) or next(iter(configs.values()))
    base = main.base_model_name_or_path or None
    hub_base = base if base and _REPO_ID.match(base) and not os.path.exists(base) else None
    task_type = getattr(main.task_type, "value", main.task_type)
    pipeline, auto_class = _PIPELINES.get(task_type, (None, "AutoModel"))
    data = ModelCardData(
        library_name="peft",
        base_model=hub_base,
        pipeline_tag=pipeline,
        tags=TAGS + ([f"base_model:adapter:{hub_base}"] if hub_base else []),
    )
    body = "\n\n".join(
        [
            _intro(base),
            _record_section(main.training_record),
            _config_section(configs),
            _usage_section(base or "<base-model>", repo_id or "<this-repo-id>", auto_class),
        ]
    )
    path = Path(folder) / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n").save(path)
    return path


def _abmll_configs(model: PeftModel) -> dict[str, ABMLLConfig]:
    configs = {n: c for n, c in getattr(model, "peft_config", {}).items() if isinstance(c, ABMLLConfig)}
    if not configs:
        raise TypeError("Expected a PeftModel with at least one ABMLL adapter.")
    return configs


def _intro(base: Optional[str]) -> str:
    target = f" for `{base}`" if base else ""
    return (
        f"# ABMLL adapter{target}\n\n"
        f"An [ABMLL]({PAPER}) adapter (Amortized Bayesian Meta-Learning for LoRA), made with `peft-abmll`: a "
        "Bayesian LoRA holding a *global* and a *local* Gaussian posterior over every low-rank weight update. "
        "The global posterior is meta-learned across tasks; the local one is a task's own, reached from it by a "
        "few gradient steps."
    )


def _record_section(record: Optional[dict]) -> str:
    """How the adapter was meta-trained and what it scored on held-out tasks (from ``training_record``)."""
    if not record:
        return "## Training\n\nNo meta-training or evaluation was recorded for this adapter."
    parts = ["## Training and evaluation"]
    meta = record.get("meta_training")
    if meta:
        rows = [f"| {key.replace('_', ' ')} | `{value}` |" for key, value in meta.items()]
        parts.append("Meta-trained with `peft_abmll.MetaTrainer`:\n\n" + "\n".join(["| | |", "|---|---|", *rows]))
    evaluation = record.get("evaluation")
    if evaluation:
        names = ", ".join(f"`{t}`" for t in evaluation["tasks"])
        metrics = ["accuracy", "nll", "ece", "brier"]
        rows = [
            f"| {kind} | " + " | ".join(f"{evaluation[kind].get(m, float('nan')):.3f}" for m in metrics) + " |"
            for kind in ("macro", "pooled")
        ]
        parts.append(
            f"Held-out tasks ({names}; {evaluation['query_examples']} query examples; adapted on a few support "
            "examples per task, then scored):\n\n"
            + "\n".join(["| | accuracy | NLL | ECE | Brier |", "|---|---|---|---|---|", *rows])
        )
    return "\n\n".join(parts)


def _config_section(configs: dict[str, ABMLLConfig]) -> str:
    parts = ["## Configuration"]
    for name, config in configs.items():
        if len(configs) > 1:
            parts.append(f"### Adapter `{name}`")
        rows = [f"| `{field}` | {_format(getattr(config, field))} |" for field in CARD_FIELDS]
        parts.append("\n".join(["| setting | value |", "|---|---|", *rows]))
    return "\n\n".join(parts)


def _format(value: object) -> str:
    if isinstance(value, (set, list, tuple)):
        return ", ".join(f"`{v}`" for v in sorted(map(str, value)))
    return f"`{value}`"


def _usage_section(base: str, repo_id: str, auto_class: str) -> str:
    return (
        "## Usage\n\n"
        "`import peft_abmll` must come **before** `PeftModel.from_pretrained`: PEFT has no plugin discovery, and "
        "importing the package is what registers the `ABMLL` adapter type with PEFT (without it, loading fails "
        "with `KeyError: 'ABMLL'`).\n\n"
        "```bash\npip install peft-abmll\n```\n\n"
        "```python\n"
        "import peft_abmll  # registers the ABMLL adapter type: import it first\n"
        "from peft import PeftModel\n"
        f"from transformers import {auto_class}\n\n"
        f'base = {auto_class}.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
        "model.eval()  # eval mode uses the posterior mean: deterministic, equal to the merged model\n"
        "# calibrated multiple-choice probabilities, averaging `num_samples` posterior samples (the setting above):\n"
        "# probs = peft_abmll.predict_proba(model, examples, tokenizer=tokenizer)\n"
        "```\n\n"
        "To use the posterior mean with plain PEFT (no plugin), export it as a LoRA adapter: "
        '`peft_abmll.export.export_lora(model, "lora-adapter")`.'
    )

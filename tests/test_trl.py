"""TRL's `SFTTrainer` with `peft_config=ABMLLConfig(...)`: trains, saves, reloads.

TRL is an optional test dependency (the `test` extra installs it); the module is skipped without it. TRL 1.x's
SFTTrainer computes its loss from the model's token log-probabilities itself, not from ``outputs.loss``; with
``compute_loss_func=peft_abmll.variational_loss`` it computes it from the logits, and the variational term the model
attaches to its outputs is added (docs/guides/pipelines.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from _tasks import tiny_lm
from datasets import Dataset
from peft import PeftModel

from peft_abmll import ABMLLConfig, ABMLLModel, VariationalLossCallback, variational_loss

trl = pytest.importorskip("trl", reason="TRL is an optional test dependency: pip install trl")


def _sft_trainer(tok, tmp_path, **kwargs) -> trl.SFTTrainer:
    texts = [f"the {a} is {b}" for a in ("cat", "dog", "fish", "bird") for b in ("red", "blue", "green", "black")]
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_length=32,
        seed=0,
    )
    return trl.SFTTrainer(
        model=tiny_lm(tok),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tok,
        peft_config=ABMLLConfig(task_type="CAUSAL_LM", init_std=0.05),
        callbacks=[VariationalLossCallback()],
        **kwargs,
    )


def test_sft_trainer_trains_saves_and_reloads_an_abmll_adapter(tok, tmp_path, recwarn) -> None:
    # compute_loss_func: the Bayesian objective (TRL's own loss ignores outputs.loss)
    trainer = _sft_trainer(tok, tmp_path, compute_loss_func=variational_loss)
    model = trainer.model
    assert isinstance(model, PeftModel) and isinstance(model.base_model, ABMLLModel)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved and all("abmll_global_" in n for n in moved)  # the global posterior trained
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("abmll_neg_log_prior" in h for h in logged)  # the variational term was in the loss
    assert not [w for w in recwarn if "ABMLL variational terms" in str(w.message)]

    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ABMLL" and saved["task_type"] == "CAUSAL_LM"
    assert "# ABMLL adapter" in (tmp_path / "adapter" / "README.md").read_text()
    reloaded = PeftModel.from_pretrained(tiny_lm(tok), tmp_path / "adapter").eval()
    trained = {k: v for k, v in model.state_dict().items() if "abmll_" in k}
    loaded = {k: v for k, v in reloaded.state_dict().items() if "abmll_" in k}
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    ids = torch.tensor([tok("the cat is red")["input_ids"]])
    with reloaded.disable_adapter():
        base = reloaded(ids).logits
    assert not torch.allclose(reloaded(ids).logits, base, atol=1e-4)  # the trained adapter is in use


def test_sft_trainer_without_the_loss_function_warns_once_that_the_variational_terms_are_left_out(tok, tmp_path):
    """TRL's own loss reads fused log-probs, never ``outputs.loss``: the user is told how to get the objective."""
    trainer = _sft_trainer(tok, tmp_path)
    with pytest.warns(UserWarning, match="compute_loss_func=peft_abmll.variational_loss") as caught:
        trainer.train()
    assert len([w for w in caught if "ABMLL variational terms" in str(w.message)]) == 1  # once, not per step
    assert not any("abmll_neg_log_prior" in h for h in trainer.state.log_history)  # nothing pretends it trained

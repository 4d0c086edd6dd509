"""Metrics against torchmetrics, Monte Carlo prediction, and Trainer features kept by MetaTrainer."""

from __future__ import annotations

import json

import pytest
import torch
from _tasks import task_family, tiny_lm
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torchmetrics.classification import MulticlassCalibrationError

import peft_abmll
from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments, metrics


@pytest.fixture(scope="module")
def family():
    return task_family(num_tasks=4, per_task=24, seed=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 200), classes=st.integers(2, 4), seed=st.integers(0, 10**6))
def test_ece_matches_torchmetrics(n: int, classes: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, classes, generator=g), dim=-1)
    labels = torch.randint(0, classes, (n,), generator=g)
    reference = MulticlassCalibrationError(num_classes=classes, n_bins=15, norm="l1")(probs, labels).item()
    assert metrics.expected_calibration_error(probs, labels, 15) == pytest.approx(reference, abs=1e-5)


def test_brier_nll_accuracy_on_a_known_case() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 1])
    m = metrics.classification_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(1 / 3)  # argmax of the tie is option 0
    assert m["nll"] == pytest.approx(-(torch.log(torch.tensor([0.7, 0.2, 0.5]))).mean().item())
    assert m["brier"] == pytest.approx(((0.3**2 * 2) + (0.8**2 * 2) + (0.5**2 * 2)) / 3)


def test_predict_proba_monte_carlo_averages_posterior_samples(tok, family) -> None:
    model = get_peft_model(tiny_lm(tok), ABMLLConfig(init_weights=False, init_std=0.2))
    examples = peft_abmll.prepare_tasks(family)["t0"][:6]
    mean = peft_abmll.predict_proba(model, examples, tokenizer=tok)
    one = peft_abmll.predict_proba(model, examples, tokenizer=tok, num_samples=1)
    torch.testing.assert_close(mean, one)  # S=1 without sample mode: the deterministic mean prediction
    many = peft_abmll.predict_proba(model, examples, tokenizer=tok, num_samples=8)
    again = peft_abmll.predict_proba(model, examples, tokenizer=tok, num_samples=8)
    torch.testing.assert_close(many, again)  # seeded samples: reproducible
    assert not torch.allclose(many, mean, atol=1e-4)
    torch.testing.assert_close(many.sum(-1), torch.ones(len(examples)))
    tuner = model.base_model
    with torch.no_grad():
        singles = []
        for i in range(8):
            with tuner.posterior_sample(i):
                singles.append(peft_abmll.predict_proba(model, examples, tokenizer=tok, num_samples=1))
    # the S-sample prediction is the average of the S single-sample predictive distributions
    assert not torch.allclose(singles[0], singles[1], atol=1e-5)


def test_posterior_samples_are_selectable_in_every_verb_and_recorded(tok, family, tmp_path) -> None:
    """S samples: predict_proba, evaluate_tasks and MetaTrainer.evaluate agree; the saved adapter and card keep S."""
    model = get_peft_model(tiny_lm(tok), ABMLLConfig(init_weights=False, init_std=0.2))
    examples = peft_abmll.prepare_tasks(family)["t0"][:6]
    args = MetaTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        eval_num_samples=4,
        eval_max_query=6,
        inner_learning_rate=1e-2,
    )
    trainer = MetaTrainer(model=model, args=args, train_dataset=family, eval_dataset=family, processing_class=tok)
    protocol = args.evaluation_protocol(num_samples=1)
    mean_metrics = peft_abmll.evaluate_tasks(model, family, tokenizer=tok, protocol=protocol)
    sampled = peft_abmll.evaluate_tasks(model, family, tokenizer=tok, protocol=protocol, num_samples=4)
    assert trainer.evaluate()["eval_nll"] == pytest.approx(sampled["macro"]["nll"], rel=1e-6)
    assert sampled["macro"]["nll"] != pytest.approx(mean_metrics["macro"]["nll"], rel=1e-6)
    trainer.train()
    assert model.peft_config["default"].num_samples == 4  # recorded by the trainer
    model.save_pretrained(tmp_path / "adapter")
    peft_abmll.hub.write_model_card(model, tmp_path / "adapter")
    assert "| `num_samples` | `4` |" in (tmp_path / "adapter" / "README.md").read_text()
    loaded = PeftModel.from_pretrained(tiny_lm(tok), tmp_path / "adapter")
    assert loaded.peft_config["default"].num_samples == 4
    torch.testing.assert_close(  # the default of the loaded adapter is its recorded S
        peft_abmll.predict_proba(loaded, examples, tokenizer=tok),
        peft_abmll.predict_proba(loaded, examples, tokenizer=tok, num_samples=4),
    )


def test_one_protocol_object_or_its_fields_give_the_same_evaluation(tok, family) -> None:
    """`EvaluationProtocol` is the one carrier of the settings; keyword settings override its fields."""
    model = get_peft_model(tiny_lm(tok), ABMLLConfig(init_weights=False, init_std=0.2))
    protocol = peft_abmll.EvaluationProtocol(support_batches=2, max_query=5, lr=1e-2, seed=3)
    by_object = peft_abmll.evaluate_tasks(model, family, tokenizer=tok, protocol=protocol)
    by_fields = peft_abmll.evaluate_tasks(model, family, tokenizer=tok, support_batches=2, max_query=5, lr=1e-2, seed=3)
    assert by_object["probs"] == by_fields["probs"] and by_object["macro"] == by_fields["macro"]
    assert all(m["n"] == 5 for m in by_object["per_task"].values())
    other = peft_abmll.evaluate_tasks(model, family, tokenizer=tok, protocol=protocol, seed=4)  # a field override
    assert other["probs"] != by_object["probs"]
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['support_steps'\]"):
        peft_abmll.evaluate_tasks(model, family, tokenizer=tok, support_steps=2)
    args = MetaTrainingArguments(output_dir="/tmp/unused", report_to=[], adaptation_steps=2, eval_max_query=5)
    assert args.evaluation_protocol().support_size == 2 * args.inner_batch_size


def test_evaluation_shows_progress_per_task_and_batch_unless_disabled(tok, family, capsys) -> None:
    from transformers.utils import logging as hf_logging

    model = get_peft_model(tiny_lm(tok), ABMLLConfig())
    settings = {"tokenizer": tok, "support_batches": 1, "max_query": 4, "name": "abmll"}
    quiet = peft_abmll.evaluate_tasks(model, family, progress=False, **settings)
    assert "evaluating" not in capsys.readouterr().err
    shown = peft_abmll.evaluate_tasks(model, family, **settings)
    err = capsys.readouterr().err
    assert "evaluating abmll" in err and "4/4 [" in err and "task" in err  # the task bar, completed
    assert "t0" in err and "batch" in err  # one batch bar per task, labelled by the task
    assert shown["probs"] == quiet["probs"]  # progress changes nothing else
    hf_logging.disable_progress_bar()
    try:
        peft_abmll.evaluate_tasks(model, family, **settings)
    finally:
        hf_logging.enable_progress_bar()
    assert "evaluating" not in capsys.readouterr().err  # transformers' switch turns every bar off


def test_predict_proba_same_with_and_without_logits_to_keep(tok, family, monkeypatch) -> None:
    from peft_abmll import adaptation

    model = get_peft_model(tiny_lm(tok), ABMLLConfig(init_weights=False, init_std=0.05))
    examples = peft_abmll.prepare_tasks(family)["t0"][:7]  # varied prompt lengths, batch 3: ragged last positions
    positions = []
    head = model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
    kept = peft_abmll.predict_proba(model, examples, tokenizer=tok, batch_size=3, num_samples=2)
    hook.remove()
    assert positions and max(positions) <= 3  # the vocabulary projection ran on the needed positions only
    monkeypatch.setattr(adaptation, "_takes_logits_to_keep", lambda model: False)
    full = peft_abmll.predict_proba(model, examples, tokenizer=tok, batch_size=3, num_samples=2)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)


def _args(tmp_path, **kwargs) -> MetaTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-2,
        inner_learning_rate=1e-2,
        disable_tqdm=True,
    )
    return MetaTrainingArguments(**{**defaults, **kwargs})


def test_bf16_meta_training_runs_and_keeps_fp32_adapter(tok, family, tmp_path) -> None:
    model = get_peft_model(tiny_lm(tok).to(torch.bfloat16), ABMLLConfig())
    trainer = MetaTrainer(model=model, args=_args(tmp_path, bf16=True), train_dataset=family, processing_class=tok)
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.view.global_params())
    assert all(torch.isfinite(p).all() for p in trainer.view.global_params())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)


def test_evaluation_during_training_and_save_model(tok, family, tmp_path) -> None:
    held_out = task_family(num_tasks=2, per_task=16, seed=3, prefix="heldout")
    model = get_peft_model(tiny_lm(tok), ABMLLConfig())
    args = _args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, eval_max_query=4)
    trainer = MetaTrainer(model=model, args=args, train_dataset=family, eval_dataset=held_out, processing_class=tok)
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_accuracy" in e]
    assert [e["step"] for e in evals] == [2, 4]
    trainer.save_model(str(tmp_path / "final"))
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ABMLL" and config["posterior"] == "global"
    reloaded = PeftModel.from_pretrained(tiny_lm(tok), str(tmp_path / "final"))
    for a, b in zip(reloaded.base_model.global_parameters(), trainer.view.global_params()):
        torch.testing.assert_close(a, b)
    for a, b in zip(reloaded.base_model.local_parameters(), reloaded.base_model.global_parameters()):
        torch.testing.assert_close(a, b)  # saved with local == global


def test_tasks_per_update_average_the_global_gradient(tok, family, tmp_path) -> None:
    """With gradient accumulation 2, one global update = the mean of two tasks' outer gradients."""
    grads = []
    for accumulation in (1, 2):
        torch.manual_seed(0)
        model = get_peft_model(tiny_lm(tok), ABMLLConfig())
        trainer = MetaTrainer(
            model=model,
            args=_args(tmp_path, gradient_accumulation_steps=accumulation),
            train_dataset=family,
            processing_class=tok,
        )
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = accumulation
        per_task = []
        for code in (0, 1):
            torch.manual_seed(code)
            trainer.training_step(trainer.model, trainer.train_dataset[code])
            per_task.append([p.grad.clone() for p in trainer.view.global_params()])
            if accumulation == 1:
                trainer.model.zero_grad()
        grads.append(per_task)
    summed_single = [a + b for a, b in zip(*grads[0])]
    accumulated = grads[1][1]
    for s, acc in zip(summed_single, accumulated):
        torch.testing.assert_close(acc, s / 2, rtol=1e-4, atol=1e-12)


def test_trainer_push_to_hub_uploads_the_adapter_with_the_abmll_card(tok, family, tmp_path, monkeypatch) -> None:
    import transformers.trainer as trainer_module

    calls: dict[str, list] = {"create_repo": [], "upload_folder": []}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"].append(repo_id)
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, **kwargs):
            folder = kwargs["folder_path"]
            import os

            calls["upload_folder"].append({**kwargs, "files": sorted(os.listdir(folder))})
            return "commit"

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    model = get_peft_model(tiny_lm(tok), ABMLLConfig())
    args = _args(tmp_path, push_to_hub=True, hub_model_id="me/abmll-test", hub_strategy="end")
    trainer = MetaTrainer(model=model, args=args, train_dataset=family, processing_class=tok)
    trainer.train()
    trainer.push_to_hub()
    assert calls["create_repo"] == ["me/abmll-test"]
    upload = calls["upload_folder"][-1]
    assert upload["repo_id"] == "me/abmll-test"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(upload["files"])
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "abmll" in card and "import peft_abmll" in card
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ABMLL"

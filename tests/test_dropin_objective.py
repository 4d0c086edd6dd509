"""The Bayesian objective wherever an ABMLL adapter trains: the model's own training loss carries the variational
terms (like transformers' MoE auxiliary losses), exactly once, and a plain Trainer learns a posterior with it."""

from __future__ import annotations

import statistics

import pytest
import torch
from _tasks import task_family, tiny_lm
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_abmll
from peft_abmll import ABMLLConfig, ABMLLLayer, TaskEncoder, VariationalLossCallback
from peft_abmll.bayes import max_log_prior_per_entry
from peft_abmll.data import prepare_tasks, seeded_torch_rng
from peft_abmll.tuner.config import size_scaled_beta


def _model(tok, task_type=None, **config):
    with seeded_torch_rng(0):
        return get_peft_model(
            tiny_lm(tok), ABMLLConfig(init_weights=False, init_std=0.05, task_type=task_type, **config)
        )


def _batch(tok) -> dict[str, torch.Tensor]:
    rows = prepare_tasks(task_family(num_tasks=1, per_task=4, seed=0))["t0"]
    enc = TaskEncoder(tok, max_length=48)
    return enc.collate([enc.encode(r) for r in rows])


def _loss(model, batch) -> torch.Tensor:
    with seeded_torch_rng(1):  # the same training noise in every call
        return model(**batch).loss


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])  # PeftModel and PeftModelForCausalLM call differently
def test_training_loss_adds_the_hyperprior_of_the_trained_global_posterior(tok, task_type) -> None:
    model = _model(tok, task_type).train()
    batch = _batch(tok)
    tuner = model.base_model
    with tuner.objective_owned():
        nll = _loss(model, batch)
    config = tuner.abmll_config()
    entries = tuner.num_adapted_entries()
    peak = entries * max_log_prior_per_entry(config.prior_mean_std, config.prior_a0, config.gamma_rate)
    assert config.beta == size_scaled_beta(entries)  # beta=None: the inner KL's weight set from the size ...
    assert config.training_loss_weight == config.loss_beta == 1.0  # ... the model's own loss: one nat per entry
    expected = nll + (peak - tuner.log_prior()) / entries  # "mean"
    torch.testing.assert_close(_loss(model, batch), expected)
    model.eval()
    with seeded_torch_rng(1):
        eval_loss = model(**batch).loss
    with tuner.objective_owned(), seeded_torch_rng(1):
        torch.testing.assert_close(eval_loss, model(**batch).loss)  # eval mode: the data loss alone


def test_the_hyperprior_term_is_zero_at_its_mode_so_a_loss_starts_at_the_nll(tok) -> None:
    """-log p(global) is measured from its largest value: a fresh adapter (mean 0, std init_std) costs ~0 nats."""
    for config in (ABMLLConfig(), ABMLLConfig(init_std=0.05), ABMLLConfig(prior_a0=3.0)):
        with seeded_torch_rng(0):
            tuner = get_peft_model(tiny_lm(tok), config).base_model
        value = tuner.variational_regularizer()[1]["neg_log_prior"]
        assert 0 <= value < 0.01, (config.init_std, config.prior_a0, value)  # measured 0.002 (the floor's share)


def test_the_largest_log_prior_matches_torch_distributions() -> None:
    from torch.distributions import Gamma, Normal

    from peft_abmll import bayes

    for mean_std, a0, b0 in ((1.0, 1.5, 5e-7), (0.3, 3.0, 2e-4)):
        precision = torch.logspace(-2, 9, 200001, dtype=torch.float64)  # a grid around every mode used here
        best = Gamma(torch.tensor(a0, dtype=torch.float64), torch.tensor(b0, dtype=torch.float64)).log_prob(precision)
        reference = Normal(0.0, mean_std).log_prob(torch.tensor(0.0)).item() + best.max().item()
        assert bayes.max_log_prior_per_entry(mean_std, a0, b0) == pytest.approx(reference, abs=1e-6)
    assert bayes.max_log_prior_per_entry(1.0, 1.0, 0.01) == 0.0  # no mode: no offset


def test_local_training_adds_the_kl_to_the_global_posterior_weighted_by_loss_beta(tok) -> None:
    model = _model(tok, loss_beta=0.5).train()
    tuner = model.base_model
    tuner.set_posterior("local")
    tuner.set_trainable_posterior("local")
    with torch.no_grad():
        for p in tuner.local_parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = _batch(tok)
    with tuner.objective_owned():
        nll = _loss(model, batch)
    kl = tuner.kl_divergence() / tuner.num_adapted_entries()
    assert kl > 0
    torch.testing.assert_close(_loss(model, batch), nll + 0.5 * kl)


def test_a_loss_computed_from_the_logits_gets_the_term_through_variational_loss(tok) -> None:
    """Trainers that compute the loss from the logits (TRL's SFTTrainer) pass `peft_abmll.variational_loss`."""
    model = _model(tok).train()
    batch = _batch(tok)
    labels = batch.pop("labels")
    with seeded_torch_rng(1):
        outputs = model(**batch)  # no labels: the term rides along as outputs.abmll_regularizer
    assert outputs.loss is None and outputs.abmll_regularizer.requires_grad
    torch.testing.assert_close(peft_abmll.variational_loss(outputs, labels), _loss(model, {**batch, "labels": labels}))
    with model.base_model.objective_owned(), seeded_torch_rng(1):
        bare = model(**batch)
    assert "abmll_regularizer" not in bare
    expected = _loss_owned(model, {**batch, "labels": labels})
    torch.testing.assert_close(peft_abmll.variational_loss(bare, labels), expected)  # no term: the NLL


def _loss_owned(model, batch) -> torch.Tensor:
    with model.base_model.objective_owned():
        return _loss(model, batch)


def test_loss_beta_zero_is_the_bare_data_loss(tok) -> None:
    model = _model(tok, loss_beta=0.0).train()
    batch = _batch(tok)
    with model.base_model.objective_owned():
        nll = _loss(model, batch)
    torch.testing.assert_close(_loss(model, batch), nll)
    with pytest.raises(ValueError, match="invalid loss_beta=-1"):
        ABMLLConfig(loss_beta=-1)


def test_meta_learning_loops_add_their_own_terms_only(tok, monkeypatch, tmp_path) -> None:
    """`adapt` and `MetaTrainer` own the objective: the model's term is never computed inside them."""
    model = _model(tok)
    tuner = model.base_model
    calls = []
    real = tuner.variational_regularizer
    monkeypatch.setattr(tuner, "variational_regularizer", lambda **kw: calls.append(1) or real(**kw))
    family = task_family(num_tasks=3, per_task=16, seed=0)
    peft_abmll.adapt(model, prepare_tasks(family)["t0"][:4], tokenizer=tok, steps=2)
    args = peft_abmll.MetaTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True
    )
    peft_abmll.MetaTrainer(model=model, args=args, train_dataset=family, processing_class=tok).train()
    assert calls == []
    model.train()
    _loss(model, _batch(tok))
    assert calls == [1]  # and outside them it is


def test_merge_and_unload_leaves_no_hook_on_the_base_model(tok) -> None:
    model = _model(tok)
    base = model.merge_and_unload()
    assert not base._forward_hooks
    base.train()
    assert torch.isfinite(base(**_batch(tok)).loss)


INIT_STD = 0.05


def _global_std(model) -> float:
    stds = [
        m.posterior_moments(name, "global")[1].sqrt().mean().item()
        for m in model.modules()
        if isinstance(m, ABMLLLayer)
        for name in m.abmll_global_mean_A
    ]
    return statistics.mean(stds)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, encoded: list[dict]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict:
        return {k: self.encoded[i][k] for k in ("input_ids", "labels")}


def _train_plain(tok, tmp_path, loss_beta):
    """A plain transformers Trainer, no ABMLL code besides the config and the log callback: 60 steps, one task."""
    with seeded_torch_rng(0):
        model = get_peft_model(tiny_lm(tok), ABMLLConfig(loss_beta=loss_beta, init_std=INIT_STD))
    enc = TaskEncoder(tok, max_length=64, answer_format="letter")  # the family's rule: always option A
    rows = [enc.encode(r) for r in prepare_tasks(task_family(num_tasks=1, per_task=64, seed=0))["t0"]]
    args = TrainingArguments(
        output_dir=str(tmp_path / str(loss_beta)),
        max_steps=60,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        logging_steps=20,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Rows(rows),
        data_collator=enc.collate,
        callbacks=[VariationalLossCallback()],
    )
    trainer.train()
    return model, trainer.state.log_history


def test_a_plain_trainer_keeps_the_posterior_width_only_with_the_variational_term(tok, tmp_path) -> None:
    """What is learned: with the term the global std stays at the hyperprior's mode (init_std); the NLL-only
    control (loss_beta=0, a noisy LoRA) shrinks it, as the noise only hurts the NLL. Both fit the data alike."""
    bayes, logs = _train_plain(tok, tmp_path, None)
    noisy, control_logs = _train_plain(tok, tmp_path, 0.0)
    assert _global_std(bayes) / INIT_STD > 0.97  # measured 0.997 / 0.997 / 0.997 on task seeds 0 / 1 / 2
    assert _global_std(noisy) / INIT_STD < 0.6  # measured 0.43 / 0.38 / 0.40: the control shows the test can fail
    steps = [h for h in logs if "loss" in h]
    assert len(steps) == 3 and all("abmll_nll" in h and "abmll_neg_log_prior" in h for h in steps)
    assert steps[-1]["abmll_nll"] < steps[0]["abmll_nll"]  # it learns the task
    final_nll = [h["loss"] for h in control_logs if "loss" in h][-1]
    assert steps[-1]["abmll_nll"] == pytest.approx(final_nll, abs=0.1)  # at no cost in fit
    assert all("abmll_nll" not in h for h in control_logs)  # weight 0: nothing added, nothing logged

"""MetaTrainer invariants: which pairs move when, resets, resume, baselines, first-order term, memory."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from _tasks import task_family, tiny_lm
from peft import get_peft_model
from transformers import TrainerCallback

import peft_abmll
from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments, TaskEncoder, algorithms
from peft_abmll.algorithms import ABMLLView, NonFiniteLossError, inner_loop
from peft_abmll.baselines import METHODS, train_method
from peft_abmll.data import seeded_torch_rng
from peft_abmll.meta.checkpoints import last_complete_checkpoint
from peft_abmll.tuner.config import BETA_FULL_SIZE, BETA_PER_ENTRY, size_scaled_beta


@pytest.fixture(scope="module")
def family():
    return task_family(num_tasks=6, per_task=24, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return task_family(num_tasks=3, per_task=30, seed=1, prefix="heldout")


def _args(tmp_path, **kwargs) -> MetaTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-2,
        inner_learning_rate=1e-2,
        seed=0,
        disable_tqdm=True,
        answer_format="letter",  # the families' known answer is a shared offset in letter space
    )
    return MetaTrainingArguments(**{**defaults, **kwargs})


def _trainer(tok, family, tmp_path, config=None, adapter_seed=0, **kwargs) -> MetaTrainer:
    base = tiny_lm(tok, seed=0)
    torch.manual_seed(adapter_seed)
    model = get_peft_model(base, config or ABMLLConfig())
    return MetaTrainer(model=model, args=_args(tmp_path, **kwargs), train_dataset=family, processing_class=tok)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(b, p) for b, p in zip(before, params)]


def _episode(trainer, code=0):
    return trainer.train_dataset[code]


def test_inner_loop_moves_only_local_pairs(tok, family):
    model = get_peft_model(tiny_lm(tok), ABMLLConfig())
    view = ABMLLView(model)
    enc = TaskEncoder(tok)
    examples = peft_abmll.prepare_tasks(family)["t0"]
    batches = [enc.batch(examples[i : i + 2]) for i in range(0, 6, 2)]
    g0, l0 = _snapshot(view.global_params()), _snapshot(view.local_params())
    model.train()
    with view.local_mode():
        logs = inner_loop(model, view, batches, lr=1e-2)
    assert len(logs) == 3 and all("nll" in step for step in logs)
    assert not any(_changed(g0, view.global_params()))
    assert all(_changed(l0, view.local_params()))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_inner_loop_optimizer_matches_the_plain_torch_one(tok, family, optimizer, monkeypatch):
    """The inner loop's (fused where available) optimizer takes the steps of torch's plain per-parameter one."""
    enc = TaskEncoder(tok)
    examples = peft_abmll.prepare_tasks(family)["t0"]
    batches = [enc.batch(examples[i : i + 2]) for i in range(0, 6, 2)]
    adapted = []
    classes = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(
                algorithms,
                "make_inner_optimizer",
                lambda ps, name, lr, wd=0.0: classes[name](ps, lr=lr, weight_decay=wd),
            )
        with seeded_torch_rng(0, 1):  # the same model and the same noise draws in both runs
            model = get_peft_model(tiny_lm(tok), ABMLLConfig(beta=1.0))
            view = ABMLLView(model)
            model.train()
            with view.local_mode():
                inner_loop(model, view, batches, lr=1e-2, optimizer=optimizer, weight_decay=0.01)
        adapted.append(_snapshot(view.local_params()))
    for fused_p, plain_p in zip(*adapted):
        torch.testing.assert_close(fused_p, plain_p, rtol=1e-4, atol=1e-6)  # float rounding only
    assert any(not torch.equal(a, b) for a, b in zip(adapted[0], _snapshot(view.global_params())))


def test_global_update_moves_only_global_pairs_and_reset(tok, family, tmp_path):
    trainer = _trainer(tok, family, tmp_path)
    trainer.create_optimizer()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.view.global_params()}
    trainer.training_step(trainer.model, _episode(trainer))
    adapted_local = _snapshot(trainer.view.local_params())
    g0 = _snapshot(trainer.view.global_params())
    trainer.optimizer.step()
    assert not any(_changed(adapted_local, trainer.view.local_params()))
    assert any(_changed(g0, trainer.view.global_params()))
    trainer.view.reset()
    for g, loc in zip(trainer.view.global_params(), trainer.view.local_params()):
        assert torch.equal(g, loc)


def test_global_mean_moves_toward_adapted_local_mean(tok, family, tmp_path):
    trainer = _trainer(tok, family, tmp_path, learning_rate=1e-3)
    trainer.create_optimizer()
    tuner = trainer.view.tuner
    trainer.training_step(trainer.model, _episode(trainer))

    def distance() -> float:
        layers = list(tuner._abmll_layers())
        return sum(
            (layer.posterior_moments("default", "global")[0] - layer.posterior_moments("default", "local")[0])
            .square()
            .sum()
            .item()
            for layer in layers
        )

    before = distance()
    trainer.optimizer.step()
    assert distance() < before


@pytest.mark.parametrize("beta", [None, BETA_FULL_SIZE * BETA_PER_ENTRY], ids=["size-scaled", "smollm2-weight"])
def test_meta_training_beats_untrained_on_held_out_tasks(tok, family, held_out, tmp_path, beta):
    """The default beta (set from the adapter's size: 0.05 on this 5k-entry model) lets meta-training learn the
    family's rule; the control, SmolLM2-135M's weight of 232 on this toy model, pins every task to the global
    posterior and learns nothing -- the test can fail, and a size-blind default would."""
    # a small test-time learning rate: 5 steps alone cannot learn the family's rule, meta-training must
    kwargs = dict(encoder=TaskEncoder(tok, answer_format="letter"), support_batches=5, lr=1e-4, max_query=12, seed=0)
    untrained = get_peft_model(tiny_lm(tok), ABMLLConfig())
    before = peft_abmll.evaluate_tasks(untrained, held_out, **kwargs)["macro"]
    trainer = _trainer(tok, family, tmp_path, config=ABMLLConfig(beta=beta), max_steps=24, learning_rate=3e-2)
    entries = trainer.model.base_model.num_adapted_entries()
    assert trainer.view.beta == (size_scaled_beta(entries) if beta is None else beta)
    trainer.train()
    after = peft_abmll.evaluate_tasks(trainer.model, held_out, **kwargs)["macro"]
    if beta is None:
        assert after["accuracy"] > before["accuracy"] + 0.2
        assert after["nll"] < before["nll"]
    else:
        assert after["accuracy"] < before["accuracy"] + 0.1


def test_resume_gives_the_same_global_adapter(tok, family, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = _trainer(tok, family, tmp_path / "full", **common)
    full.train()  # also writes checkpoint-2, the state an interrupted run would have left
    resumed = _trainer(tok, family, tmp_path / "resumed", adapter_seed=1, **common)  # other init: state must load
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    for a, b in zip(full.view.global_params(), resumed.view.global_params()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["regular_lora", "structured_lora"])
def test_an_interrupted_lora_baseline_resumes_to_the_uninterrupted_adapter(method, tok, family, tmp_path):
    """The LoRA baselines' checkpoints are marked complete, so ``resume_from_checkpoint=True`` finds them.

    Without the marker `last_complete_checkpoint` saw none, a rerun started over, and the Trainer's rotation
    deleted the finished run's checkpoint.
    """
    save = dict(save_strategy="steps", save_steps=_args(tmp_path).inner_steps)  # a checkpoint per episode
    full = train_method(method, lambda: tiny_lm(tok), tok, family, _args(tmp_path / "full", max_steps=2, **save))
    cut = _args(tmp_path / "cut", max_steps=2, **save)
    train_method(method, lambda: tiny_lm(tok), tok, family, cut, callbacks=[_StopAt(cut.inner_steps)])
    out = Path(cut.output_dir)
    assert last_complete_checkpoint(out) == out / f"checkpoint-{cut.inner_steps}"  # after the first episode
    steps = _StopAt(10**9)  # never stops; notes the first step this run takes
    resumed = train_method(
        method, lambda: tiny_lm(tok), tok, family, cut, resume_from_checkpoint=True, callbacks=[steps]
    )
    assert steps.first == cut.inner_steps + 1  # it starts at the second episode (a restart from 0 would match `full`)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        if "lora_" in name:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert last_complete_checkpoint(out) == out / f"checkpoint-{2 * cut.inner_steps}"


class _StopAt(TrainerCallback):
    """Ends training after optimiser step `step`, as an interruption would (its checkpoint is written first)."""

    def __init__(self, step: int) -> None:
        self.step, self.first = step, None

    def on_step_end(self, args, state, control, **kwargs):
        self.first = self.first or state.global_step
        if state.global_step >= self.step:  # only ever set: the Trainer's own stop at max_steps must stand
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("method", METHODS)
def test_each_baseline_trains_and_adapts(method, tok, family, held_out, tmp_path):
    model = train_method(method, lambda: tiny_lm(tok), tok, family, _args(tmp_path, max_steps=2))
    results = peft_abmll.evaluate_tasks(model, held_out, tokenizer=tok, lr=1e-2, max_query=4)
    assert 0.0 <= results["macro"]["accuracy"] <= 1.0
    assert set(results["per_task"]) == {"heldout0", "heldout1", "heldout2"}


def test_first_order_switch_changes_the_global_gradient(tok, family, tmp_path):
    grads = {}
    for first_order in (False, True):
        trainer = _trainer(tok, family, tmp_path, first_order=first_order, query_batches=1)
        trainer.create_optimizer()
        trainer.training_step(trainer.model, _episode(trainer))
        grads[first_order] = [p.grad.clone() for p in trainer.view.global_params()]
    assert any(not torch.allclose(a, b) for a, b in zip(grads[False], grads[True]))


def test_inner_loop_gradients_survive_activation_checkpointing(tok, family, tmp_path):
    trainer = _trainer(tok, family, tmp_path, gradient_checkpointing=True)
    assert trainer.args.gradient_checkpointing_kwargs["use_reentrant"] is False
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    l0 = _snapshot(trainer.view.local_params())
    with trainer.view.local_mode():
        inner_loop(trainer.model, trainer.view, _episode(trainer)["support"], lr=1e-2)
    assert all(_changed(l0, trainer.view.local_params()))
    with pytest.raises(ValueError, match="use_reentrant"):
        _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})


def test_memory_is_constant_over_repeated_episodes(tok, family, tmp_path):
    trainer = _trainer(tok, family, tmp_path)
    trainer.create_optimizer()
    n_params = sum(p.numel() for p in trainer.model.parameters())

    def run(episodes: int) -> int:
        for code in range(episodes):
            trainer.training_step(trainer.model, _episode(trainer, code % 6))
            trainer.optimizer.step()
            trainer.model.zero_grad(set_to_none=True)
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    run(3)
    baseline = run(3)
    assert run(12) <= baseline
    assert sum(p.numel() for p in trainer.model.parameters()) == n_params


def test_non_finite_loss_names_step_and_task(tok, family, tmp_path):
    trainer = _trainer(tok, family, tmp_path)
    with torch.no_grad():
        trainer.view.global_params()[0].fill_(float("nan"))
    episode = _episode(trainer)
    with pytest.raises(NonFiniteLossError, match=rf"global step 0 .*{episode['task']}"):
        trainer.training_step(trainer.model, episode)


def test_first_order_needs_query_batches(tmp_path):
    with pytest.raises(ValueError, match="query_batches"):
        _args(tmp_path, first_order=True, query_batches=0)


def test_trainer_logs_meta_terms(tok, family, tmp_path):
    trainer = _trainer(tok, family, tmp_path)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and {"nll", "kl", "outer_kl_per_entry", "hyperprior_per_entry", "global_std_rms"} <= set(logged[0])
    paper = _trainer(tok, family, tmp_path / "paper", global_update="gradient")
    paper.train()
    logged = [entry for entry in paper.state.log_history if "loss" in entry]
    assert logged and {"nll", "kl", "outer_kl", "log_prior"} <= set(logged[0])


def test_evaluate_writes_json_and_reliability_png(tok, family, held_out, tmp_path):
    model = get_peft_model(tiny_lm(tok), ABMLLConfig())
    trainer = MetaTrainer(
        model=model,
        args=_args(tmp_path, eval_max_query=4),
        train_dataset=family,
        eval_dataset=held_out,
        processing_class=tok,
    )
    metrics = trainer.evaluate()
    assert {"eval_accuracy", "eval_ece", "eval_nll", "eval_brier"} <= set(metrics)
    out = tmp_path / "out"
    assert (out / "eval_step0_results.json").is_file()
    assert (out / "eval_step0_reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for g, loc in zip(trainer.view.global_params(), trainer.view.local_params()):
        assert torch.equal(g, loc)  # evaluation undid its adaptations


def test_predict_returns_probabilities_labels_and_test_metrics_like_trainer_predict(tok, family, held_out, tmp_path):
    """`Trainer.predict` on held-out tasks: the query probabilities, their labels and ``test_*`` metrics that
    match `evaluate` on the same tasks (same seeded support draws)."""
    model = get_peft_model(tiny_lm(tok), ABMLLConfig())
    trainer = MetaTrainer(
        model=model, args=_args(tmp_path, eval_max_query=4), train_dataset=family, processing_class=tok
    )
    seen = []

    class OnPredict(TrainerCallback):
        def on_predict(self, args, state, control, metrics, **kwargs):
            seen.append(metrics)

    trainer.add_callback(OnPredict())
    output = trainer.predict(held_out)
    n_tasks = len(set(held_out["task"]))
    assert output.predictions.shape == (4 * n_tasks, trainer.args.max_choices)  # padded to max_choices
    assert output.label_ids.shape == (4 * n_tasks,) and not output.predictions[:, 3:].any()  # 3 options each
    np.testing.assert_allclose(output.predictions.sum(axis=1), 1.0, rtol=1e-5)
    pooled = float((output.predictions.argmax(1) == output.label_ids).mean())
    assert output.metrics["test_pooled_accuracy"] == pytest.approx(pooled)
    evaluated = trainer.evaluate(held_out)
    assert output.metrics["test_nll"] == pytest.approx(evaluated["eval_nll"])
    assert seen == [output.metrics]


def test_adapter_remembers_its_adaptation_rate(tok, family, tmp_path):
    """The saved adapter carries the test-time rate it was meta-learned for; `adapt` uses it by default."""
    from peft import PeftModel

    from peft_abmll.adaptation import adaptation_learning_rate
    from peft_abmll.algorithms import DEFAULT_INNER_LR

    fresh = get_peft_model(tiny_lm(tok), ABMLLConfig())
    assert fresh.peft_config["default"].adaptation_learning_rate is None
    assert adaptation_learning_rate(fresh) == DEFAULT_INNER_LR
    trainer = _trainer(tok, family, tmp_path, max_steps=1, inner_learning_rate=2e-2, adaptation_learning_rate=5e-3)
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_lm(tok), tmp_path / "adapter", is_trainable=True)
    assert loaded.peft_config["default"].adaptation_learning_rate == 5e-3 == adaptation_learning_rate(loaded)

    support = [e for e in family if e["task"] == "t0"][:10]

    def adapted_state(**kwargs):
        torch.manual_seed(0)  # the training noise of the adaptation
        logs = peft_abmll.adapt(loaded, support, tokenizer=tok, steps=3, seed=0, **kwargs)
        return logs, [p.detach().clone() for n, p in loaded.named_parameters() if "local" in n]

    default_logs, default_state = adapted_state()
    recorded_logs, recorded_state = adapted_state(lr=5e-3)
    _, package_state = adapted_state(lr=DEFAULT_INNER_LR)
    assert default_logs == recorded_logs and all(map(torch.equal, default_state, recorded_state))
    assert not all(map(torch.equal, default_state, package_state))

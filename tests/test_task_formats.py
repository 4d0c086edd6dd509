"""Every verb takes the task format it documents: a `datasets.Dataset`, a list of dicts, or any sequence of rows."""

from __future__ import annotations

import pytest
import torch
from _tasks import task_family, tiny_lm
from datasets import Dataset
from peft import get_peft_model

import peft_abmll
from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments
from peft_abmll.data import as_examples, seeded_torch_rng


@pytest.fixture(scope="module")
def family() -> Dataset:
    return task_family(num_tasks=3, per_task=16, seed=0)


def _formats(dataset: Dataset) -> dict[str, object]:
    rows = [dict(r) for r in dataset]
    return {"Dataset": dataset, "list": rows, "tuple": tuple(rows)}


def _model(tok):
    with seeded_torch_rng(0):
        return get_peft_model(tiny_lm(tok), ABMLLConfig(init_weights=False, init_std=0.05))


def test_predict_proba_same_for_every_format(tok, family) -> None:
    one_task = family.filter(lambda r: r["task"] == "t0").select(range(7))
    model = _model(tok)
    results = {name: peft_abmll.predict_proba(model, rows, tokenizer=tok) for name, rows in _formats(one_task).items()}
    for name, probs in results.items():
        torch.testing.assert_close(probs, results["list"], msg=name)
    with_shots = {
        name: peft_abmll.predict_proba(model, rows, tokenizer=tok, shots=rows, num_shots=2)
        for name, rows in _formats(one_task).items()
    }
    for probs in with_shots.values():
        torch.testing.assert_close(probs, with_shots["list"])


def test_adapt_same_for_every_format(tok, family) -> None:
    support = family.filter(lambda r: r["task"] == "t1").select(range(10))
    adapted = {}
    for name, rows in _formats(support).items():
        model = _model(tok)
        with seeded_torch_rng(1):
            peft_abmll.adapt(model, rows, tokenizer=tok, steps=3, lr=1e-2)
        adapted[name] = [p.detach().clone() for p in model.base_model.local_parameters()]
    for name, params in adapted.items():
        for a, b in zip(params, adapted["list"]):
            torch.testing.assert_close(a, b, msg=name)


def test_evaluate_tasks_same_for_every_format(tok, family) -> None:
    rows = [dict(r) for r in family]
    by_task = {
        name: [{k: v for k, v in r.items() if k != "task"} for r in rows if r["task"] == name]
        for name in ("t0", "t1", "t2")
    }
    formats = {
        "Dataset": family,
        "list of rows": rows,
        "dict of Datasets": {k: Dataset.from_list(v) for k, v in by_task.items()},
        "dict of lists": by_task,
    }
    results = {}
    for name, data in formats.items():
        results[name] = peft_abmll.evaluate_tasks(_model(tok), data, tokenizer=tok, lr=1e-2, max_query=4)["pooled"]
    for name, pooled in results.items():
        assert pooled == pytest.approx(results["Dataset"], rel=1e-6), name


def test_meta_trainer_takes_every_format(tok, family, tmp_path) -> None:
    rows = [dict(r) for r in family]
    globals_ = {}
    for name, data in {"Dataset": family, "list of rows": rows}.items():
        args = MetaTrainingArguments(
            output_dir=str(tmp_path / name),
            max_steps=2,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            inner_learning_rate=1e-2,
            seed=0,
        )
        trainer = MetaTrainer(model=_model(tok), args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
        trainer.train()
        globals_[name] = [p.detach().clone() for p in trainer.view.global_params()]
    for a, b in zip(globals_["Dataset"], globals_["list of rows"]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ({"question": ["q"], "choices": [["a", "b"]], "label": [0]}, TypeError, "Dataset.from_dict"),
        ([], ValueError, "empty"),
        (["not a row"], TypeError, "row 0 is a str"),
        ([{"question": "q", "choices": ["a", "b"]}], ValueError, r"row 0 lacks \['label'\]"),
    ],
)
def test_bad_rows_get_a_message_naming_the_problem(bad, error, match) -> None:
    with pytest.raises(error, match=match):
        as_examples(bad, "my task")

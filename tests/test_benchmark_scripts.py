"""The logic of `benchmarks/quality.py` that its numbers depend on: pruning, ablation plans, tables."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from _models import tiny_llama
from peft import get_peft_model

from peft_abmll import ABMLLConfig

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
_spec = importlib.util.spec_from_file_location("quality_benchmark", _PATH)
quality = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = quality  # dataclass type hints resolve through sys.modules
_spec.loader.exec_module(quality)


def _mlps(model):
    return [m for m in model.modules() if hasattr(m, "down_proj") and hasattr(m, "up_proj")]


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_prune_zeroes_the_smallest_hidden_units_of_every_layer(fraction) -> None:
    model = get_peft_model(tiny_llama(), ABMLLConfig(target_modules=["down_proj", "q_proj"]))
    scores = [m.down_proj.get_base_layer().weight.norm(dim=0) * m.up_proj.weight.norm(dim=1) for m in _mlps(model)]
    pruned = quality.prune_hidden_units(model, fraction)
    hidden = scores[0].numel()
    assert pruned == len(scores) * int(fraction * hidden)
    for mlp, score in zip(_mlps(model), scores):
        dead = (mlp.up_proj.weight == 0).all(dim=1) & (mlp.down_proj.get_base_layer().weight == 0).all(dim=0)
        assert int(dead.sum()) == int(fraction * hidden)
        assert score[dead].max() <= score[~dead].min()  # the smallest-magnitude units went first


def test_pruned_block_restores_the_weights_exactly() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with quality.pruned(model, 0.3):
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_set_ablations_name_jobs_and_refuse_unknown_fields() -> None:
    assert quality.parse_setting("prior_b0=1e-6") == ("prior_b0", 1e-6)
    assert quality.parse_setting("scale_type=softplus") == ("scale_type", "softplus")
    with pytest.raises(argparse.ArgumentTypeError, match="ABMLLConfig field"):
        quality.parse_setting("not_a_field=1")
    flags = ["--methods", "pretrained", "abmll", "--beta", "1", "--set", "prior_b0=1e-6"]
    flags += ["--arg", "outer_step_size=0.1", "--variants", "weight", "--prune", "0.5"]
    options, _ = quality.parse(flags)
    jobs = {job["name"]: job for job in quality.plan(options)}
    assert set(jobs) == {
        "pretrained",
        "abmll",
        "abmll-beta1",
        "abmll-prior_b0=1e-06",
        "abmll-outer_step_size=0.1",
        "abmll-weight",
        "pretrained-outer_step_size=0.1",
    }
    assert jobs["pretrained-outer_step_size=0.1"] | {"prune": None} == {
        **jobs["abmll-outer_step_size=0.1"],
        "name": "pretrained-outer_step_size=0.1",
        "method": "pretrained",
        "config": {},
        "samples": [],
        "test_shots": [],
        "prune": None,
    }
    # ABMLL records without a beta of their own stay at the beta they were measured with (1), --beta sets it
    assert jobs["abmll-prior_b0=1e-06"]["config"] == {"beta": quality.RECORDED_BETA, "prior_b0": 1e-6}
    assert jobs["abmll"]["config"] == {"beta": 1.0}
    assert jobs["abmll-weight"]["config"] == {"beta": 1.0, "sampling": "weight"}
    (sized,) = quality.only(quality.plan(quality.parse(["--methods", "abmll", "--beta", "232"])[0]), ["abmll-beta232"])
    assert sized["config"] == {"beta": 232.0}
    assert jobs["pretrained"]["config"] == {}
    assert jobs["abmll-outer_step_size=0.1"]["args"] == {"outer_step_size": 0.1}
    assert quality.parse_argument("global_update=gradient") == ("global_update", "gradient")
    with pytest.raises(argparse.ArgumentTypeError, match="MetaTrainingArguments field"):
        quality.parse_argument("prior_b0=1")
    assert jobs["abmll"]["prune"] == [0.0, 0.5] and jobs["abmll-weight"]["prune"] == [0.0]
    assert quality.record_names(jobs["pretrained"]) == ["pretrained", "pretrained-prune0.5"]


def test_summary_table_averages_seeds() -> None:
    def record(name, seed, acc):
        metrics = {"accuracy": acc, "ece": 0.1, "nll": 1.0, "brier": 0.5}
        return {"name": name, "seed": seed, "macro": metrics, "train_seconds": 1.0, "global_std": None}

    table = quality.summarise([record("a", 0, 0.2), record("a", 1, 0.4), record("b", 0, 0.5)], markdown=True)
    lines = table.splitlines()
    assert len(lines) == 4
    assert "| a | 2 | 0.300 ± 0.141 |" in lines[2] and "| b | 1 | 0.500 ± 0.000 |" in lines[3]
    assert "resumed" not in table
    resumed = {**record("b", 0, 0.5), "resumed_from_step": 150}
    assert "resumed" in quality.summarise([resumed]).splitlines()[-1]  # its train time is only part of the run


def test_pruning_curve_uses_only_the_seeds_that_were_pruned(tmp_path) -> None:
    """Seed 0 was never pruned: its unpruned accuracy must not enter the curve's 0 % point."""

    def record(name, seed, prune, acc):
        metrics = {"accuracy": acc, "ece": acc / 2}
        return {"name": name, "method": name.split("-")[0], "seed": seed, "prune": prune, "macro": metrics}

    records = [
        record("abmll", 0, 0.0, 0.9),
        record("abmll", 1, 0.0, 0.5),
        record("abmll-prune0.02", 1, 0.02, 0.4),
        record("abmll-prune0.05", 1, 0.05, 0.3),
        record("reptile", 1, 0.0, 0.6),  # never pruned: no curve
    ]
    curves = quality.pruning_curves(records)
    assert list(curves) == ["abmll"]
    assert curves["abmll"] == [(0.0, 0.5, 0.25), (0.02, 0.4, 0.2), (0.05, 0.3, 0.15)]
    assert quality.plot_pruning(records, tmp_path / "p.png").stat().st_size > 0


def test_a_job_argument_overrides_the_command_line_default(tmp_path, monkeypatch) -> None:
    """``--arg outer_step_size=0.1`` wins over ``--outer_step_size`` (it used to raise a duplicate-keyword error)."""
    seen = {}

    def fake_run(method, model_fn, tokenizer, train, held_out, margs, config, **kwargs):
        seen["args"] = margs
        raise RuntimeError("stop")

    monkeypatch.setattr(quality, "run_method", fake_run)
    options, base = quality.parse(["--outer_step_size", "1.0", "--work_dir", str(tmp_path), "--max-query", "2"])
    job = {"name": "abmll-outer_step_size=0.1", "method": "abmll", "config": {}, "args": {"outer_step_size": 0.1}}
    with pytest.raises(RuntimeError, match="stop"):
        quality.run_one(job, 3, options, base, (None, None), None, None)
    margs = seen["args"]
    assert (margs.outer_step_size, margs.seed, margs.eval_max_query) == (0.1, 3, 2)
    assert margs.output_dir == str(tmp_path / job["name"] / "seed3")


def test_a_rerun_resumes_from_the_last_complete_checkpoint_and_records_its_step(tmp_path, monkeypatch) -> None:
    """An interrupted run resumes from its newest *complete* checkpoint; the record says from which step."""
    from peft_abmll.meta.checkpoints import mark_checkpoint_complete

    seen = {}

    def fake_run(method, model_fn, tokenizer, train, held_out, margs, config, **kwargs):
        seen["resume"] = kwargs["resume_from_checkpoint"]
        raise RuntimeError("stop")

    monkeypatch.setattr(quality, "run_method", fake_run)
    options, base = quality.parse(["--work_dir", str(tmp_path), "--save_every", "50"])
    job = {"name": "abmll", "method": "abmll", "config": {}, "args": {}, "prune": [0.0]}
    with pytest.raises(RuntimeError, match="stop"):
        quality.run_one(job, 0, options, base, (None, None), None, None)
    assert seen["resume"] is None  # nothing to resume from
    run_dir = tmp_path / "abmll" / "seed0"
    for step in (50, 100):
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
        (run_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    mark_checkpoint_complete(run_dir / "checkpoint-50", 50)  # checkpoint-100 was cut off while saving
    with pytest.raises(RuntimeError, match="stop"):
        quality.run_one(job, 0, options, base, (None, None), None, None)
    assert seen["resume"] is True
    assert quality._checkpoint_step(quality.last_complete_checkpoint(run_dir)) == 50
    assert quality._checkpoint_step(None) == 0


def test_samples_evaluate_each_trained_abmll_model_again_with_s_posterior_samples(tmp_path, monkeypatch) -> None:
    """``--samples 4``: one training, two evaluations (the default and S = 4), two records; baselines: one."""
    seen = []
    result = {"macro": {}, "pooled": {}, "per_task": {}, "probs": [], "labels": [], "eval_seconds": 0.0}
    monkeypatch.setattr(quality, "run_method", lambda *a, **k: (torch.nn.Linear(1, 1), {**result, "train_seconds": 1}))
    monkeypatch.setattr(
        quality, "evaluate_tasks", lambda *a, protocol, **k: seen.append(protocol.num_samples) or result
    )
    monkeypatch.setattr(quality.MetaTrainingArguments, "task_encoder", lambda self, tok: None)
    options, base = quality.parse(["--work_dir", str(tmp_path), "--samples", "4", "--methods", "abmll", "reptile"])
    jobs = {job["name"]: job for job in quality.plan(options)}
    assert quality.record_names(jobs["abmll"]) == ["abmll", "abmll-S4"]
    assert quality.record_names(jobs["reptile"]) == ["reptile"]
    records = quality.run_one(jobs["abmll"], 0, options, base, (None, None), None, None)
    assert [(r["name"], r["samples"]) for r in records] == [("abmll", None), ("abmll-S4", 4)]
    assert seen == [4]  # the default evaluation is run_method's own; S = 4 is one more


def test_test_shots_evaluate_every_trained_model_again_with_in_context_examples(tmp_path, monkeypatch) -> None:
    """``--test_shots 2``: the training's own evaluation (no examples in the prompt), then one with 2 solved
    support examples in front of each prompt; every method gets it, and the record says so."""
    seen = []
    result = {"macro": {}, "pooled": {}, "per_task": {}, "probs": [], "labels": [], "eval_seconds": 0.0}
    monkeypatch.setattr(quality, "run_method", lambda *a, **k: (torch.nn.Linear(1, 1), {**result, "train_seconds": 1}))
    monkeypatch.setattr(
        quality,
        "evaluate_tasks",
        lambda *a, protocol, **k: seen.append((protocol.num_shots, protocol.num_samples)) or result,
    )
    monkeypatch.setattr(quality.MetaTrainingArguments, "task_encoder", lambda self, tok: None)
    flags = ["--work_dir", str(tmp_path), "--test_shots", "2", "--samples", "4", "--methods", "abmll", "reptile"]
    options, base = quality.parse(flags)
    jobs = {job["name"]: job for job in quality.plan(options)}
    assert quality.record_names(jobs["abmll"]) == ["abmll", "abmll-S4", "abmll-test_shots2"]
    assert quality.record_names(jobs["reptile"]) == ["reptile", "reptile-test_shots2"]
    records = quality.run_one(jobs["reptile"], 0, options, base, (None, None), None, None)
    assert [(r["name"], r["test_shots"]) for r in records] == [("reptile", None), ("reptile-test_shots2", 2)]
    assert seen == [(2, None)]  # the default evaluation is run_method's own; one more with the examples
    options, base = quality.parse([*flags, "--num_shots", "1"])  # trained with 1 example: the default keeps it
    seen.clear()
    quality.run_one(jobs["abmll"], 0, options, base, (None, None), None, None)
    assert seen == [(1, 4), (2, None)]


def test_a_rerun_with_more_evaluations_reloads_the_model_and_runs_only_the_new_ones(tmp_path, monkeypatch) -> None:
    """``abmll`` is in the results file: adding ``--samples 4`` reloads it (no second default evaluation)."""
    seen, trained = [], []
    result = {"macro": {}, "pooled": {}, "per_task": {}, "probs": [], "labels": [], "eval_seconds": 0.0}

    def fail(*a, **k):
        raise AssertionError("run_method evaluates the model again")

    monkeypatch.setattr(quality, "run_method", fail)
    monkeypatch.setattr(quality, "train_method", lambda *a, **k: trained.append(a[0]) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(
        quality, "evaluate_tasks", lambda *a, protocol, **k: seen.append(protocol.num_samples) or result
    )
    monkeypatch.setattr(quality.MetaTrainingArguments, "task_encoder", lambda self, tok: None)
    options, base = quality.parse(["--work_dir", str(tmp_path), "--samples", "4", "--methods", "abmll"])
    (job,) = quality.plan(options)
    done = {"abmll": {"name": "abmll", "seed": 0, "train_seconds": 123.0, "resumed_from_step": 0}}
    records = quality.run_one(job, 0, options, base, (None, None), None, None, done=done)
    assert trained == ["abmll"] and seen == [4]
    assert [(r["name"], r["train_seconds"], r["resumed_from_step"]) for r in records] == [("abmll-S4", 123.0, 0)]


def test_only_keeps_the_named_configurations_of_the_plan_and_refuses_unknown_ones() -> None:
    options, _ = quality.parse(["--methods", "abmll", "reptile", "--set", "init_std=0.01"])
    jobs = quality.plan(options)
    assert [j["name"] for j in quality.only(jobs, None)] == ["abmll", "reptile", "abmll-init_std=0.01"]
    assert [j["name"] for j in quality.only(jobs, ["abmll-init_std=0.01"])] == ["abmll-init_std=0.01"]
    with pytest.raises(SystemExit, match=r"abmll-init_std=0\.1: not a configuration .* abmll-init_std=0\.01"):
        quality.only(jobs, ["abmll-init_std=0.1"])


def test_benchmark_flags_are_the_training_arguments_with_this_benchmarks_presets(tmp_path) -> None:
    options, base = quality.parse(["--steps", "7", "--learning_rate", "0.01", "--answer-format", "option"])
    assert (base.max_steps, base.learning_rate, base.answer_format) == (7, 0.01, "option")
    assert (base.max_length, base.eval_max_query, base.max_grad_norm) == (256, 200, 0.0)  # presets, then dataclass
    assert options.seeds == [0, 1, 2] and options.methods == list(quality.METHODS)
    split = tmp_path / "split.json"
    split.write_text('{"meta_train": ["a", "b"], "validation": ["c"]}')
    options, _ = quality.parse(["--split", str(split)])
    assert (options.train_tasks, options.eval_tasks) == (["a", "b"], ["c"])
    with pytest.raises(SystemExit):
        quality.parse(["--methods", "nope"])
    with pytest.raises(argparse.ArgumentTypeError, match="ABMLLConfig field"):
        quality.parse(["--set", "nope=1"])


def test_interval_table_pairs_configurations_on_the_same_examples() -> None:
    """A configuration that is better on every example shows a paired difference whose interval excludes 0."""

    records = [_scored_record("pretrained", s, 0.0) for s in (0, 1)] + [_scored_record("abmll", s, 2.0) for s in (0, 1)]
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in quality.interval_summary(records, n_resamples=200).splitlines()
    }
    cells = rows["abmll"].strip("| ").split(" | ")
    assert cells[1:3] == ["2", "80"]  # seeds, examples behind every number
    delta_accuracy = cells[7]
    value, low, high = (float(x) for x in delta_accuracy.replace("[", "").replace("]", "").replace(",", "").split())
    assert 0 < low <= value <= high
    assert rows["pretrained"].count("–") == 4  # no difference to itself


def test_per_task_table_takes_each_tasks_own_examples() -> None:
    """Each task row is computed from that task's slice of every seed's examples (here: only task b is learned)."""
    records = []
    for seed in (0, 1):
        record = _scored_record("abmll", seed, 0.0)
        labels = torch.tensor(record["labels"])
        probs = torch.tensor(record["probs"])
        probs[20:] = torch.nn.functional.one_hot(labels[20:], 3) * 0.9 + 0.1 / 3  # task b: right and sure
        record["probs"] = probs.tolist()
        records.append(record)
    rows = {
        line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
        for line in quality.per_task_summary(records, n_resamples=100).splitlines()[2:]
    }
    assert set(rows) == {"a", "b"} and rows["b"][1] == "40"  # 20 examples × 2 seeds
    assert rows["b"][2].startswith("1.000")
    assert float(rows["a"][2].split()[0]) < 0.8


def _scored_record(name: str, seed: int, shift: float, temperature: float = 1.0) -> dict:
    """40 query examples of 3 options over two tasks; `shift` adds logit mass on the true option."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (40,), generator=g)
    logits = torch.randn(40, 3, generator=g) + shift * torch.nn.functional.one_hot(labels, 3)
    return {
        "name": name,
        "seed": seed,
        "prune": 0.0,
        "probs": torch.softmax(logits / temperature, -1).tolist(),
        "labels": labels.tolist(),
        "per_task": {"a": {"n": 20}, "b": {"n": 20}},
    }


def test_paired_summary_marks_what_the_interval_decides() -> None:
    """Same examples: a better-informed focus is ``better`` on accuracy; a near-uniform baseline loses on NLL / ECE."""
    records = [_scored_record("abmll", s, 2.0) for s in (0, 1)]
    records += [_scored_record("weak", s, 0.0) for s in (0, 1)]
    records += [_scored_record("same", s, 2.0) for s in (0, 1)]
    records += [_scored_record("hot", s, 2.0, temperature=5.0) for s in (0, 1)]  # same argmax, underconfident
    rows = {
        line.split(" | ")[0].strip("| "): line for line in quality.paired_summary(records, n_resamples=200).splitlines()
    }
    weak, same, hot = (rows[k].strip("| ").split(" | ") for k in ("weak", "same", "hot"))
    assert weak[1:3] == ["2", "80"] and weak[3].endswith("better") and weak[4].endswith("better")  # accuracy, NLL
    assert same[3].startswith("+0.000 [+0.000, +0.000]") and not same[3].endswith(("better", "worse"))
    assert hot[3].startswith("+0.000") and hot[4].endswith("better") and hot[6].endswith("better")  # NLL, ECE
    assert "abmll" not in rows and quality.paired_summary(records, focus="missing") == "(no records of 'missing')"


def test_reliability_png_has_one_panel_per_configuration(tmp_path) -> None:
    import matplotlib.image

    records = [_scored_record(name, 0, 1.0) for name in ("a", "b", "c")]
    path = quality.plot_reliability(records, tmp_path / "r.png")
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 2 * height  # three panels side by side


def test_choose_split_keeps_half_the_passing_tasks_untouched() -> None:
    screen = _load_script("screen")
    results = [{"task": f"t{i}", "format": "option", "passes": i % 3 != 0} for i in range(15)]
    results += [{"task": "t0", "format": "letter", "passes": True}, {"task": "s", "format": "option", "skipped": "x"}]
    split = screen.choose_split(results, "option", seed=0)
    passing = {f"t{i}" for i in range(15) if i % 3 != 0}
    lists = [set(split[k]) for k in ("untouched", "validation", "meta_train")]
    assert set().union(*lists) == passing and sum(map(len, lists)) == len(passing)  # disjoint, complete
    assert [len(x) for x in lists] == [5, 3, 2]
    assert set(split["failing"]) == {f"t{i}" for i in range(0, 15, 3)}
    assert screen.choose_split(results, "option", seed=0) == split
    assert screen.choose_split(results, "option", seed=1)["untouched"] != split["untouched"]
    family = [{"task": f"multiemo/t{i}", "format": "option", "passes": True} for i in range(8)]
    family += [{"task": f"solo{i}", "format": "option", "passes": True} for i in range(4)]
    capped = screen.choose_split(family, "option", seed=0, max_per_family=2)
    tuned = capped["validation"] + capped["meta_train"]
    assert sum(t.startswith("multiemo/") for t in tuned) <= 2 and len(capped["untouched"]) >= 6
    assert sorted(tuned + capped["untouched"]) == sorted(r["task"] for r in family)
    wider = screen.choose_split(results, "option", seed=0, meta_train_failing=True)
    assert set(wider["meta_train"]) == set(split["meta_train"]) | set(split["failing"])  # failing tasks train too
    assert (wider["validation"], wider["untouched"]) == (split["validation"], split["untouched"])
    failing_family = family + [{"task": f"multiemo/f{i}", "format": "option", "passes": False} for i in range(3)]
    capped_wider = screen.choose_split(failing_family, "option", seed=0, max_per_family=2, meta_train_failing=True)
    assert sum(t.startswith("multiemo/") for t in capped_wider["validation"] + capped_wider["meta_train"]) <= 2


def test_the_screen_samples_at_most_a_few_tasks_of_a_family() -> None:
    screen = _load_script("screen")
    results = [{"task": f"multiemo/t{i}", "format": "option", "passes": True} for i in range(3)]
    results.append({"task": "multiemo/t9", "format": "option", "skipped": "12 examples"})  # not screened
    assert screen.family_full(results, "multiemo/t5", cap=3)
    assert not screen.family_full(results, "multiemo/t5", cap=4)
    assert not screen.family_full(results, "snarks", cap=3)  # another family
    assert not screen.family_full(results[:2] + results[3:], "multiemo/t5", cap=3)  # a skipped task is not one
    assert not screen.family_full(results, "multiemo/t5", cap=None)


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screen_separates_a_learnable_task_from_zero_shot(tok, tmp_path) -> None:
    """A generated task whose answer is always the first option: the oracle learns it, zero-shot does not."""
    from _tasks import task_family, tiny_lm

    screen = _load_script("screen")
    rows = [dict(r) for r in task_family(num_tasks=1, per_task=160, seed=3)]
    args = screen.main.__globals__["argparse"].Namespace(
        eval=60, train=100, steps=60, inner_steps=5, batch=2, lr=1e-2, max_length=64, seed=0, work_dir=str(tmp_path)
    )
    result = screen.screen_task("t0", rows, "letter", lambda: tiny_lm(tok), tok, args)  # always "A)"
    assert (result["n_eval"], result["n_train"]) == (60, 100)
    assert result["oracle"]["accuracy"]["value"] > 0.9 > result["zero_shot"]["accuracy"]["value"]
    assert result["passes"]
    line = screen.table([result, {"task": "tiny", "format": "letter", "skipped": "12 examples"}])
    assert "| t0 | letter | 60 / 100 | 60 × 2 | 0.33 |" in line and "skipped: 12 examples" in line


def test_dropin_benchmark_compares_lora_and_abmll_on_the_same_examples(tok, tmp_path) -> None:
    """The single-task drop-in benchmark on a generated task: same split for both, paired table, S modes."""
    from _tasks import task_family, tiny_lm

    dropin = _load_script("dropin")
    rows = [dict(r) for r in task_family(num_tasks=1, per_task=40, seed=0)]
    args = dropin.main.__globals__["argparse"].Namespace(
        train=24, eval=12, epochs=1.0, batch=4, lr=1e-2, r=4, max_length=48, samples=[1, 2], work_dir=str(tmp_path)
    )
    args.quiet, args.scorings = True, ["option", "option_sum"]
    both = dropin.run_seed(0, rows, lambda: tiny_lm(tok), tok, args)
    names = ["lora", "lora|option_sum", "abmll-S1", "abmll-S2", "abmll-S1|option_sum", "abmll-S2|option_sum"]
    assert [r["name"] for r in both] == names and sorted(dropin.record_names(args)) == sorted(names)
    by_name = {r["name"]: r for r in both}
    # every option here is one token, so its summed and mean log-likelihoods agree (multi-token: test_option_scoring)
    assert by_name["lora"]["probs"] == by_name["lora|option_sum"]["probs"]
    records = [r for r in both if "|" not in r["name"]]
    assert all(r["labels"] == records[0]["labels"] and len(r["probs"]) == 12 for r in records)  # the same examples
    assert records[1]["probs"] != records[2]["probs"]  # two samples are not the posterior mean
    train, held_out = dropin.split(rows, 24, 12, 0)
    assert len(train) == 24 and len(held_out) == 12 and not {id(r) for r in train} & {id(r) for r in held_out}
    table = dropin.summary(records + [{**r, "seed": 1} for r in records]).splitlines()
    assert table[2].startswith("| lora | 2 | 24 |") and table[2].endswith("– | – | – | – |")
    assert table[4].startswith("| abmll-S2 | 2 | 24 |") and "–" not in table[4]
    sum_table = dropin.summary(both).splitlines()
    assert any(line.startswith("| abmll-S1\\|option_sum |") and "–" not in line for line in sum_table)  # paired
    args.settings, args.samples, args.scorings = {"init_std": 0.01}, [1], ["option"]  # a variant: LoRA is done
    variant = dropin.run_seed(0, rows, lambda: tiny_lm(tok), tok, args, done=frozenset({"lora"}))
    assert [r["name"] for r in variant] == ["abmll[init_std=0.01]-S1"] == dropin.record_names(args)[1:]
    assert variant[0]["probs"] != records[1]["probs"]  # another configuration, on the same examples
    assert variant[0]["labels"] == records[0]["labels"]


def test_cost_ratios_are_per_round_medians_with_their_spread() -> None:
    """Each round's ABMLL is compared with that round's LoRA; the table gives the median and the range."""
    cost = _load_script("cost")

    def row(method: str, k: int, seconds: float) -> dict:
        return {
            "model": "m",
            "method": method,
            "round": k,
            "step_s": seconds,
            "episode_s": 5 * seconds,
            "peak_rss_mb": 1000.0,
            "train_rss_mb": 100.0,
            "infer_s": 1.0,
        }

    lora = [1.0, 2.0, 1.0]  # a slow round for both: the per-round ratio removes it
    abmll = [1.2, 2.6, 1.1]
    rows = [row("lora", k, s) for k, s in enumerate(lora)] + [row("abmll-local", k, s) for k, s in enumerate(abmll)]
    m = cost.summarise(rows)["m"]["abmll-local"]
    assert m["rounds"] == 3 and m["episode_ratio"] == pytest.approx(1.2)  # median of 1.2, 1.3, 1.1
    assert (m["episode_ratio_min"], m["episode_ratio_max"]) == (pytest.approx(1.1), pytest.approx(1.3))
    assert m["step_s"] == pytest.approx(1.2) and "1.10-1.30" in cost.table(cost.summarise(rows))
    assert cost.rotated(["a", "b", "c"], 1) == ["b", "c", "a"] and cost.rotated(["a", "b"], 2) == ["a", "b"]


def test_cost_model_extrapolates_depth_and_its_worker_times_every_phase(monkeypatch) -> None:
    model = _load_script("cost_model")
    # a linear cost in depth is recovered exactly; noise around a line is averaged (least squares)
    assert model.extrapolate({1: 3.0, 2: 5.0}, 10) == pytest.approx(3.0 + 9 * 2.0)
    assert model.extrapolate({1: 3.1, 2: 4.8, 4: 9.1}, 10) == pytest.approx(1.0 + 2.0 * 10, abs=0.5)
    with pytest.raises(ValueError, match="two depths"):
        model.extrapolate({1: 3.0}, 10)
    one, two = {"lora": 1.0, "inner": 1.2, "global": 0.5}, {"lora": 1.5, "inner": 1.9, "global": 1.0}
    p = model.predict({1: one, 2: two}, layers=4, k=5)
    assert (p["lora"], p["inner"], p["global"]) == (pytest.approx(2.5), pytest.approx(3.3), pytest.approx(2.0))
    assert p["episode_ratio"] == pytest.approx((5 * 3.3 + 2.0) / (5 * 2.5))
    tiny = dict(arch="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=97)  # fmt: skip
    monkeypatch.setitem(model.SHAPES, "tiny", tiny)
    times = model.worker({"shape": "tiny", "layers": 2, "batch": 1, "seq": 8, "reps": 1, "threads": 1})
    assert set(times) == {"lora", "inner", "global"} and all(t > 0 for t in times.values())
    row = {"shape": "tiny", "layers": 3, "predicted": model.predict({1: times, 2: times}, 3)}
    assert "| tiny | 3 |" in model.table([row]) and model.table([row]).rstrip().endswith("| – |")  # no CUDA memory
    measured = {**times, "episode_ratio": 1.2, "lora_peak_mb": 100.0, "inner_peak_mb": 103.0}
    assert "| 1.030 |" in model.table([{**row, "measured": measured}])  # CUDA: ABMLL's train memory over LoRA's


def test_cost_model_from_one_layer_timed_alone(monkeypatch) -> None:
    model = _load_script("cost_model")
    one = {"lora": 2.0, "inner": 2.5, "global": 0.1, "layer_lora": 0.5, "layer_inner": 0.75}
    p = model.predict_from_layer(one, layers=5, k=5)
    # T(n) = T(1) + (n - 1) * layer; the global update is all per-layer work
    assert (p["lora"], p["inner"], p["global"]) == (pytest.approx(4.0), pytest.approx(5.5), pytest.approx(0.5))
    assert p["episode_ratio"] == pytest.approx((5 * 5.5 + 0.5) / (5 * 4.0))
    for arch in ("llama", "qwen2"):
        tiny = dict(arch=arch, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=97)  # fmt: skip
        monkeypatch.setitem(model.SHAPES, "tiny", tiny)
        spec = {"shape": "tiny", "layers": 1, "batch": 1, "seq": 8, "reps": 1, "threads": 1, "layer_phases": True}
        times = model.worker(spec)
        assert set(times) == {"lora", "inner", "global", "layer_lora", "layer_inner"}
        assert all(t > 0 for t in times.values())


def test_cost_model_layer_step_trains_only_that_layer_and_abmll_pays_its_kl() -> None:
    """The layer phases move the first layer's adapter (LoRA's factors, ABMLL's local pairs, not its global)."""
    import torch

    model = _load_script("cost_model")
    tiny = dict(arch="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=97)  # fmt: skip
    lora, abmll = model.peft_models(tiny, 1, torch.device("cpu"))
    ids = torch.randint(0, 97, (1, 8))
    model.episode_phases(lora, abmll, {"input_ids": ids, "labels": ids})  # one inner step: local != global
    phases = model.layer_phases(lora, abmll, {"input_ids": ids, "labels": ids})
    lora_before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    abmll_before = {n: p.detach().clone() for n, p in abmll.named_parameters() if "abmll_" in n}
    phases["layer_lora"]()
    phases["layer_inner"]()
    lora_b = [n for n in lora_before if "lora_B" in n]  # B starts at 0, so the first step moves B (A's grad is 0)
    assert lora_b and all(not torch.equal(dict(lora.named_parameters())[n], lora_before[n]) for n in lora_b)
    moved = {n for n, p in abmll.named_parameters() if n in abmll_before and not torch.equal(p, abmll_before[n])}
    assert moved and all("local" in n for n in moved)


def test_profile_splits_an_episode_into_its_pieces(monkeypatch, tmp_path, capsys) -> None:
    cost_model = _load_script("cost_model")
    monkeypatch.setitem(sys.modules, "cost_model", cost_model)  # what the profiler script imports
    tiny = dict(arch="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=97)  # fmt: skip
    monkeypatch.setitem(cost_model.SHAPES, "tiny", tiny)
    profiler = _load_script("profile_step")
    out = tmp_path / "profile.json"
    profiler.main(["--shape", "tiny", "--seq", "8", "--reps", "1", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    inner, outer, lora = rows["ABMLL inner step"], rows["ABMLL global update"], rows["LoRA step"]
    assert inner["abmll.kl"] > 0 and inner["abmll.noise"] > 0 and inner["Optimizer.step#"] > 0
    assert outer["abmll.global_direction"] > 0 and outer["abmll.kl"] == 0  # the direction is not the fused KL
    assert lora["abmll.kl"] == lora["abmll.noise"] == 0 and lora["Optimizer.step#"] > 0
    assert "| ABMLL inner step |" in capsys.readouterr().out


def test_quality_records_from_two_runs_share_one_file(tmp_path: Path) -> None:
    """Two processes (one per method) append to one JSON: each write keeps what the other wrote meanwhile."""
    out = tmp_path / "quality.json"
    a = quality.save_records(out, [{"name": "abmll", "seed": 0, "v": 1}], {"run": "a"})
    b = quality.save_records(out, [{"name": "reptile", "seed": 0, "v": 2}], {"run": "b"})  # `a` not re-read by b
    assert [r["name"] for r in a] == ["abmll"] and sorted(r["name"] for r in b) == ["abmll", "reptile"]
    again = quality.save_records(out, [{"name": "abmll", "seed": 0, "v": 3}], {"run": "a"})  # a rerun replaces
    assert sorted((r["name"], r["v"]) for r in again) == [("abmll", 3), ("reptile", 2)]
    assert json.loads(out.read_text())["records"] == again


def test_width_script_meta_trains_both_families_and_writes_their_widths(tmp_path, capsys) -> None:
    """Two episodes per family at a large inner learning rate: the widths move off the prior's and are recorded."""
    width = _load_script("width")
    out = tmp_path / "width.json"
    width.main(["--inner-lr", "1e-2", "--seeds", "0", "--steps", "2", "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    assert run["inner_lr"] == 1e-2 and run["seed"] == 0
    for family in ("disagreeing", "agreeing"):
        assert run[family]["global_std"] > ABMLLConfig.init_std  # the adapted posteriors' spread widens it
        assert run[family]["spread_rms"] > 0
    assert run["ratio"] == pytest.approx(run["disagreeing"]["global_std"] / run["agreeing"]["global_std"])
    assert "| 0.01 | 0 |" in capsys.readouterr().out


def test_paired_tables_compare_on_the_seeds_both_configurations_have() -> None:
    """A baseline with fewer seeds is still paired with the focus, on the common seeds only (same examples)."""
    records = [_scored_record("abmll", s, 2.0) for s in (0, 1, 2)] + [_scored_record("lora", s, 2.0) for s in (0, 1)]
    records += [_scored_record("other", 5, 2.0)]  # no seed in common: no row
    rows = {
        line.split(" | ")[0].strip("| "): line for line in quality.paired_summary(records, n_resamples=50).splitlines()
    }
    lora = rows["lora"].strip("| ").split(" | ")
    assert lora[1:3] == ["2", "80"] and lora[3].startswith("+0.000 [+0.000, +0.000]")  # identical on seeds 0-1
    assert "other" not in rows
    table = quality.interval_summary(records, reference="lora", n_resamples=50)
    abmll = next(line for line in table.splitlines() if line.startswith("| abmll "))
    assert abmll.strip("| ").split(" | ")[1:3] == ["3", "120"] and "(seeds 0,1)" in abmll


def test_a_pruned_focus_is_paired_with_the_same_fraction_and_the_unpruned_models() -> None:
    """``--focus abmll-prune0.02``: rows for the unpruned models and those pruned by 2 %, none pruned otherwise."""
    records = [_scored_record(n, 0, 2.0) for n in ("abmll", "lora")]
    records += [
        {**_scored_record(f"{n}-prune{f:g}", 0, 0.0), "prune": f} for n in ("abmll", "lora") for f in (0.02, 0.1)
    ]
    rows = {
        line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
        for line in quality.paired_summary(records, focus="abmll-prune0.02", n_resamples=50).splitlines()[2:]
    }
    assert set(rows) == {"abmll", "lora", "lora-prune0.02"}
    assert rows["lora-prune0.02"][3].startswith("+0.000 [+0.000, +0.000]")  # same logits: identical
    assert rows["abmll"][3].endswith("worse")  # the pruned record has no signal left
    unpruned = quality.paired_summary(records, focus="abmll", n_resamples=50).splitlines()[2:]
    assert [line.split(" | ")[0].strip("| ") for line in unpruned] == ["lora"]


def test_report_only_prints_the_tables_of_the_asked_seeds_and_runs_nothing(tmp_path, monkeypatch, capsys) -> None:
    def record(name: str, seed: int) -> dict:
        macro = {"accuracy": 0.5, "ece": 0.1, "nll": 1.0, "brier": 0.5}
        extra = {"method": name, "macro": macro, "train_seconds": 1.0, "global_std": None}
        return {**_scored_record(name, seed, 1.0), **extra}

    out = tmp_path / "q.json"
    out.write_text(json.dumps({"records": [record(n, s) for n in ("abmll", "reptile") for s in (0, 1, 2)]}))
    monkeypatch.setattr(quality, "load_causal_lm", lambda *a, **k: pytest.fail("--report_only loaded a model"))
    flags = ["--out", str(out), "--methods", "abmll", "reptile", "pretrained", "--seeds", "0", "1", "--report_only"]
    quality.main(flags)
    printed = capsys.readouterr()
    assert "| abmll | 2 |" in printed.out and "| reptile | 2 | 80 |" in printed.out  # seed 2 left out
    assert "('pretrained', 0)" in printed.err  # what is missing is said, not run
    assert (tmp_path / "q.reliability.png").exists()


def test_report_only_without_matching_records_says_what_to_check(tmp_path, monkeypatch) -> None:
    """An --out with none of the asked records (a wrong path, seed or name) is refused with the fix, not a traceback."""
    monkeypatch.setattr(quality, "load_causal_lm", lambda *a, **k: pytest.fail("--report_only loaded a model"))
    with pytest.raises(SystemExit, match=r"No records of .*'abmll'.* on seeds \[5\]"):
        quality.main(["--out", str(tmp_path / "missing.json"), "--methods", "abmll", "--seeds", "5", "--report_only"])
    assert not (tmp_path / "missing.reliability.png").exists()

"""The `abmll` command end to end, in-process through `peft_abmll.cli.main`, on tiny fake assets built here:
a word-level tokenizer + tiny random Llama saved to a folder, a BIG-bench-layout ``.tar.gz`` served as the cached
archive under ``$ABMLL_CACHE``, and a local JSONL task file."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tarfile
import types
from pathlib import Path

import pytest
from _models import run_python
from _tasks import tiny_lm, tiny_tokenizer
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_abmll import cli
from peft_abmll.meta.arguments import MetaTrainingArguments
from peft_abmll.tuner.config import ABMLLConfig

NOUNS = ["cat", "dog", "fish", "bird", "cow", "sun", "moon", "star", "tree", "rock"]
COLOURS = ["red", "blue", "green", "black", "white"]
PER_TASK = 30
# BIG-bench-layout tasks: name -> number of options ("animals" is a parent whose two subtasks hold the examples)
FAKE_BIGBENCH = {"colours": 3, "animals/one": 2, "animals/two": 3, "held_out": 3, "held_two": 2}
TRAIN = ["colours", "animals"]
HELD_OUT = ["held_out", "held_two"]
FAST = ["--max-query", "4", "--adapt-steps", "2", "--inner-steps", "2"]  # small support sets and inner loops


# ----------------------------------------------------------------------------------------------- fake assets
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _examples(seed: int, options: int) -> list[dict]:
    """`PER_TASK` seeded multiple-choice examples: ``question``, ``choices``, ``label``."""
    rng = random.Random(seed)
    out = []
    for _ in range(PER_TASK):
        choices = rng.sample(COLOURS, options)
        out.append({"question": f"the {rng.choice(NOUNS)} is", "choices": choices, "label": rng.randrange(options)})
    return out


def _make_archive(path: Path) -> Path:
    """A ``bigbench-1.0.0.tar.gz`` in the sdist layout holding the `FAKE_BIGBENCH` multiple-choice tasks."""
    members = {"bigbench-1.0.0/README.md": b"fake"}
    tasks: dict[str, dict] = {"animals": {"name": "animals", "description": "parent of subtasks"}}
    for seed, (name, options) in enumerate(FAKE_BIGBENCH.items()):
        examples = [
            {"input": e["question"], "target_scores": {c: float(i == e["label"]) for i, c in enumerate(e["choices"])}}
            for e in _examples(seed, options)
        ]
        tasks[name] = {"name": name, "task_prefix": "Pick a colour.\n", "examples": examples}
    for name, task in tasks.items():
        members[f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"] = json.dumps(task).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory):
    """Model folder, local task file and a ``$ABMLL_CACHE`` whose cached BIG-bench archive is the fake one."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        cache = root / "cache"
        mp.setenv("ABMLL_CACHE", str(cache))
        _make_archive(cache / "downloads" / "bigbench-1.0.0.tar.gz")  # where `bigbench_archive()` looks
        model = root / "tiny-llama"
        tokenizer = tiny_tokenizer()
        tiny_lm(tokenizer).save_pretrained(model)
        tokenizer.save_pretrained(model)  # next to the weights: AutoTokenizer.from_pretrained(model) works
        local = root / "local_words.jsonl"
        local.write_text("".join(json.dumps(e) + "\n" for e in _examples(99, 2)))
        yield types.SimpleNamespace(root=root, model=str(model), local=str(local), cache=cache)


def test_fake_assets_load(fake) -> None:
    from peft_abmll.experiment import load_causal_lm, resolve_tasks

    loaded, reference = AutoTokenizer.from_pretrained(fake.model), tiny_tokenizer()
    text = "Question: the cat is\nAnswer: B)"
    assert loaded(text)["input_ids"] == reference(text)["input_ids"] and loaded.pad_token == "[PAD]"
    model_fn, _ = load_causal_lm(fake.model)
    assert model_fn() is not model_fn()  # fresh copies
    tasks = resolve_tasks([*TRAIN, fake.local])
    assert {n: len(d) for n, d in tasks.items()} == {"colours": 30, "animals": 60, "local_words": 30}


# ----------------------------------------------------------------------------------------------- round trip
def test_train_evaluate_adapt_round_trip(fake, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["--model", fake.model, "--output-dir", str(out), "--steps", "3", "--eval-tasks", "held_out", *FAST]
    assert cli.main(["train", "--tasks", *TRAIN, fake.local, *args]) == 0
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "ABMLL" and config["posterior"] == "global"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()
    printed = capsys.readouterr().out
    assert f"Adapter saved to {adapter}" in printed
    card = (adapter / "README.md").read_text()
    assert "Meta-trained with `peft_abmll.MetaTrainer`" in card and "Held-out tasks (`held_out`" in card
    assert "held_out" in printed and "macro" in printed  # --eval-tasks report
    assert json.loads((out / "evaluate_results.json").read_text())["per_task"]["held_out"]["n"] == 4

    ev = tmp_path / "eval"
    evaluate = ["evaluate", "--model", fake.model, "--adapter", str(adapter), "--output-dir", str(ev)]
    assert cli.main([*evaluate, "--tasks", *HELD_OUT, fake.local, "--max-query", "4", "--adapt-steps", "2"]) == 0
    results = json.loads((ev / "evaluate_results.json").read_text())
    assert sorted(results["per_task"]) == ["held_out", "held_two", "local_words"]
    assert all(m["n"] == 4 and 0 <= m["accuracy"] <= 1 for m in results["per_task"].values())
    assert 0 <= results["macro"]["ece"] <= 1 and results["macro"]["nll"] > 0
    assert (ev / "evaluate_reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["task", "accuracy", "ECE", "NLL", "n"]
    assert [line.split()[0] for line in printed[1:]] == ["held_out", "held_two", "local_words", "macro"]
    assert float(printed[-1].split()[1]) == pytest.approx(results["macro"]["accuracy"], abs=1e-3)

    adapted = out / "adapted"
    adapt = ["adapt", "--model", fake.model, "--adapter", str(adapter), "--task", "held_out", "--support", "10"]
    assert cli.main([*adapt, "--adapt-steps", "3", "--save-to", str(adapted)]) == 0
    assert "Adapted on 10 examples (final NLL" in capsys.readouterr().out
    config = json.loads((adapted / "adapter_config.json").read_text())
    assert config["peft_type"] == "ABMLL" and config["posterior"] == "local"
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(adapted / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any("abmll_local_mean_A" in k for k in before)
    assert all(before[k].equal(after[k]) for k in before if "abmll_global_" in k)  # the meta-learned prior is kept
    assert any(not before[k].equal(after[k]) for k in before if "abmll_local_" in k)  # the posterior moved

    # a fresh interpreter: `import peft_abmll` is all PeftModel.from_pretrained needs, and the local posterior is used
    result = run_python(
        f"""
import torch, peft_abmll
from peft import PeftModel
from transformers import AutoModelForCausalLM
ids, logits = torch.tensor([[5, 6, 7, 8, 9]]), {{}}
for name in ("adapter", "adapted"):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({fake.model!r}), {str(out)!r} + "/" + name)
    assert type(model.base_model).__name__ == "ABMLLModel", type(model.base_model)
    logits[name] = model.eval()(ids).logits
print(model.peft_config["default"].posterior, (logits["adapter"] - logits["adapted"]).abs().max().item())
"""
    )
    posterior, change = result.stdout.split()[-2:]
    assert posterior == "local" and float(change) > 0


def test_evaluate_scores_in_the_format_the_adapter_was_trained_with(fake, tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    train = ["train", "--tasks", *TRAIN, "--model", fake.model, "--output-dir", str(out), "--steps", "2", *FAST]
    assert cli.main([*train, "--answer_format", "letter"]) == 0
    evaluate = ["evaluate", "--model", fake.model, "--adapter", str(out / "adapter"), "--tasks", *HELD_OUT[:1]]
    evaluate += ["--max-query", "4", "--adapt-steps", "1"]
    macro = {}
    for name, extra in (
        ("recorded", []),
        ("letter", ["--answer_format", "letter"]),
        ("option", ["--answer_format", "option"]),
    ):
        with caplog.at_level(logging.INFO, logger="peft_abmll"):
            assert cli.main([*evaluate, "--output-dir", str(tmp_path / name), *extra]) == 0
        macro[name] = json.loads((tmp_path / name / "evaluate_results.json").read_text())["macro"]
    assert "answer_format='letter', the format the adapter was meta-trained with" in caplog.text
    assert macro["recorded"] == macro["letter"] and macro["option"]["nll"] != pytest.approx(macro["letter"]["nll"])


@pytest.mark.parametrize("method", ["regular_lora", "reptile"])
def test_train_baselines(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Both baselines train through `abmll train`; reptile takes model and tasks from a --config file whose
    method and step budget the command line overrides."""
    from peft_abmll import baselines

    calls = []
    real = baselines.train_method
    monkeypatch.setattr(cli, "train_method", lambda m, *a, **k: calls.append((m, a[2], a[3])) or real(m, *a, **k))
    out = tmp_path / method
    argv = ["train", "--method", method, "--steps", "3", "--output-dir", str(out), *FAST]
    if method == "reptile":
        config = {"model": fake.model, "tasks": [*TRAIN, fake.local], "method": "abmll", "steps": 500}
        argv += ["--config", _write(tmp_path / "reptile.json", json.dumps(config))]
    else:
        argv += ["--model", fake.model, "--tasks", *TRAIN]
    assert cli.main(argv) == 0
    [(called, tasks, margs)] = calls
    assert called == method and margs.max_steps == 3 and margs.inner_steps == 2
    assert sorted(tasks) == sorted([*TRAIN, "local_words"] if method == "reptile" else TRAIN)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fake.model), str(out / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained away from LoRA's zero init
    assert not list(out.glob("*_results.json"))  # no --eval-tasks: no evaluation


def test_demo_quick(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(cli, "DEMO_TRAIN_TASKS", (*TRAIN, fake.local))
    monkeypatch.setattr(cli, "DEMO_EVAL_TASKS", tuple(HELD_OUT))
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--model", fake.model, "--steps", "2", "--max-query", "4", "--adapt-steps", "2"]
    assert cli.main([*argv, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Held-out tasks: held_out, held_two" in printed
    lines = printed.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("method ")) :]
    assert table[0].split() == ["method", "accuracy", "ECE", "NLL", "Brier", "train", "s"]
    assert [line.split()[0] for line in table[1:4]] == ["pretrained", "regular_lora", "abmll"]
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["pretrained", "regular_lora", "abmll"]
    assert results["settings"]["max_steps"] == 2  # an explicit --steps wins over --quick's budget
    assert all(sorted(r["per_task"]) == HELD_OUT for r in results["methods"].values())
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "abmll" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "ABMLL"
    card = (out / "abmll" / "adapter" / "README.md").read_text()
    assert "Held-out tasks (`held_out`, `held_two`" in card and "base_model" not in card.split("---")[1]  # local base


# ----------------------------------------------------------------------------------------------- --config
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_values_and_overrides(tmp_path: Path, suffix: str) -> None:
    values = {
        "model": "my-model",
        "tasks": ["a", "b/c"],
        "steps": 7,
        "learning-rate": 0.01,
        "first_order": True,
        "query-batches": 1,  # first_order needs one: MetaTrainingArguments checks it while parsing
        "method": "reptile",
        "target-modules": ["q_proj"],
    }
    text = json.dumps(values) if suffix == ".json" else "\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items())
    config = _write(tmp_path / f"c{suffix}", text)
    args = cli.parse_args(["train", "--config", config])
    options, meta = args.options, args.meta
    assert (options.model, options.tasks, meta.max_steps, meta.learning_rate) == ("my-model", ["a", "b/c"], 7, 0.01)
    assert meta.first_order is True and options.method == "reptile" and args.abmll_config.target_modules == {"q_proj"}
    assert meta.seed == 0 and meta.inner_steps == 5  # not in the file: the parser default
    assert {"model", "tasks", "max_steps", "learning_rate", "first_order", "method", "target_modules"} <= args.given
    args = cli.parse_args(["train", "--config", config, "--steps", "3", "--tasks", "z", "--method", "abmll"])
    assert (args.meta.max_steps, args.options.tasks, args.options.method) == (3, ["z"], "abmll")
    assert args.options.model == "my-model"


def test_config_scalars_are_parsed_like_flags(tmp_path: Path) -> None:
    text = "tasks: snarks\nlearning_rate: 1e-3\nsteps: '5'\ninner-lr: '2e-4'\nbatch_size: '3'\n"  # YAML: 1e-3 is a str
    args = cli.parse_args(["train", "--config", _write(tmp_path / "c.yaml", text)])
    assert args.options.tasks == ["snarks"] and args.meta.learning_rate == 1e-3 and args.meta.max_steps == 5
    assert args.meta.inner_learning_rate == 2e-4 and args.meta.inner_batch_size == 3  # aliases as keys


@pytest.mark.parametrize(
    ("command", "text", "bad"),
    [
        ("train", "steps: 3\nstepz: 4\n", "stepz"),
        ("train", "adapter: some/folder\n", "adapter"),  # an option of another subcommand
        ("evaluate", '{"tasks": ["x"], "support": 5}', "support"),
    ],
)
def test_config_unknown_keys(tmp_path: Path, capsys: pytest.CaptureFixture, command: str, text: str, bad: str) -> None:
    config = _write(tmp_path / ("c.json" if text.startswith("{") else "c.yaml"), text)
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--config", config])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown option(s) in {config}: {bad}" in err


def _refused(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run `argv` through `cli.main`, expect argparse's usage error (exit 2), return its stderr."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_config_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _write(tmp_path / "c.yaml", "method: nonsense\n")
    assert "method in " + config + ": invalid choice 'nonsense'" in _refused(capsys, ["train", "--config", config])
    config = _write(tmp_path / "c.yaml", "steps: [1\n")
    assert f"cannot read config {config}: while parsing" in _refused(capsys, ["train", "--config", config])
    config = _write(tmp_path / "c.json", "{'steps': 3}")
    assert f"cannot read config {config}: Expecting property name" in _refused(capsys, ["train", "--config", config])
    missing = str(tmp_path / "missing.yaml")
    assert f"cannot read config {missing}: [Errno 2]" in _refused(capsys, ["train", "--config", missing])
    config = _write(tmp_path / "c.yaml", "- a\n- b\n")
    assert f"{config} must hold a mapping" in _refused(capsys, ["train", "--config", config])
    config = _write(tmp_path / "c.yaml", "steps: many\n")
    assert f"steps in {config}: invalid value 'many'" in _refused(capsys, ["train", "--config", config])
    config = _write(tmp_path / "c.yaml", "steps: [1, 2]\n")
    assert f"steps in {config}: expects one value, got [1, 2]" in _refused(capsys, ["train", "--config", config])


def test_config_yaml_python_tags_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    for payload in (
        f"!!python/object/apply:os.system [{json.dumps(f'touch {marker}')}]",
        f"!!python/object/apply:subprocess.check_call [[touch, {json.dumps(str(marker))}]]",
        f"!!python/object/new:pathlib.Path [{json.dumps(str(marker))}]",
    ):
        config = _write(tmp_path / "evil.yaml", f"model: {payload}\n")
        err = _refused(capsys, ["train", "--config", config, "--tasks", "x"])
        assert f"cannot read config {config}: could not determine a constructor for the tag" in err
        assert "python/object" in err and not marker.exists()


# ----------------------------------------------------------------------------------------------- help, errors
@pytest.mark.parametrize("command", [None, "demo", "train", "evaluate", "adapt"])
def test_help_mentions_every_option(command: str | None, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"] if command else ["--help"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    target = sub.choices[command] if command else parser
    options = [s for a in target._actions for s in a.option_strings]
    assert options and [o for o in options if o not in printed] == []
    if command is None:
        assert all(name in printed for name in ("demo", "train", "evaluate", "adapt"))
    else:
        assert len([a for a in target._actions if a.help]) == len(target._actions)  # every option documented


def test_console_script() -> None:
    """The installed ``abmll`` entry point runs `cli.main` (a fresh interpreter: a few seconds)."""
    script = shutil.which("abmll")
    assert script, "the abmll console script is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: abmll train") and "--eval-tasks" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train"], "abmll train: error: give --tasks"),
        (["evaluate"], "abmll evaluate: error: give --tasks"),
        (["adapt", "--task", "x"], "abmll adapt: error: give --adapter"),
    ],
)
def test_missing_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert _one_error_line(capsys, argv).startswith(message)


def test_bad_task_specs(fake, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from peft_abmll.experiment import resolve_tasks

    with pytest.raises(ValueError, match="Unknown BIG-bench task 'nope'"):
        resolve_tasks(["nope"])
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        resolve_tasks([str(tmp_path / "missing.jsonl")])
    argv = ["train", "--model", fake.model, "--tasks", "colours", "gone.csv"]
    assert _one_error_line(capsys, argv) == "abmll train: error: Task file 'gone.csv' not found."
    with pytest.raises(FileNotFoundError, match=r"gone\.csv"):
        cli.main([*argv, "--debug"])


def test_one_inner_learning_rate_default_everywhere(tmp_path: Path) -> None:
    """The benchmark-chosen inner / test-time rate is the default of every entry point."""
    import inspect

    from peft_abmll import EvaluationProtocol, MetaTrainingArguments, adapt
    from peft_abmll.algorithms import DEFAULT_INNER_LR

    args = MetaTrainingArguments(output_dir=str(tmp_path))
    parsed = cli.parse_args(["train", "--model", "m", "--tasks", "t"])
    assert args.inner_learning_rate == parsed.meta.inner_learning_rate == DEFAULT_INNER_LR
    # adapt / evaluate_tasks: None = the adapter's recorded rate, else DEFAULT_INNER_LR (tests/test_meta_trainer.py)
    assert inspect.signature(adapt).parameters["lr"].default is None
    assert EvaluationProtocol().lr is None  # evaluate_tasks(..., lr=...) overrides the protocol's
    assert args.evaluation_protocol().lr == DEFAULT_INNER_LR
    assert parsed.meta.evaluation_protocol().lr == DEFAULT_INNER_LR
    custom = MetaTrainingArguments(output_dir=str(tmp_path), inner_learning_rate=1e-3)
    assert custom.evaluation_protocol().lr == 1e-3  # test-time rate follows the inner one unless set


# ----------------------------------------------------------------------------------------------- options
def _command_parser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[command]


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_defaults_are_the_dataclass_defaults_but_the_presets(command: str) -> None:
    parser = _command_parser(command)
    fields: dict[str, dataclasses.Field] = {}
    for dtype in parser.dataclass_types:  # a name already taken keeps its first field (train: the CLI's --debug)
        fields.update({f.name: f for f in dataclasses.fields(dtype) if f.init and f.name not in fields})
    presets, seen = cli.PRESETS[command], set()
    for action in parser._actions:
        if action.dest not in fields or isinstance(action, argparse._StoreFalseAction) or action.dest in seen:
            continue
        seen.add(action.dest)
        expected = presets.get(action.dest, _default(fields[action.dest]))
        assert action.default == expected, action.dest
    assert seen == set(fields) and fields["debug"].metadata["help"] == "Print the full traceback of an error."
    assert set(presets) <= seen and f"output_dir={presets['output_dir']}" in parser.description
    assert parser.get_default("max_length") == (256 if command == "demo" else 512)
    assert parser.get_default("seed") == 0 and parser.get_default("output_dir") == "abmll-output"


def test_generated_options_copy_the_dataclass_fields() -> None:
    meta_fields = {f.name: f for f in dataclasses.fields(MetaTrainingArguments)}
    for f in dataclasses.fields(cli.MetaOptions):
        assert dict(f.metadata) == dict(meta_fields[f.name].metadata) and f.default == meta_fields[f.name].default
    assert cli.MetaOptions.__dataclass_fields__["inner_batch_size"].metadata["aliases"] == ["--batch-size"]
    config_fields = {f.name: f for f in dataclasses.fields(ABMLLConfig)}
    for f in dataclasses.fields(cli.AdapterOptions):
        source = config_fields[f.name]
        assert f.default is None and f.metadata["help"].startswith(source.metadata["help"])
        assert f.metadata["help"].endswith(f"(default: {source.default!r}, ABMLLConfig's)")
    assert cli.AdapterOptions.__dataclass_fields__["r"].metadata["help"].endswith("(default: 8, ABMLLConfig's)")
    # the one name the CLI's options share with MetaTrainingArguments: --debug (see cli.OptionParser)
    assert {f.name for f in dataclasses.fields(cli.TrainOptions)} & set(meta_fields) == {"debug"}
    assert {f.name for f in dataclasses.fields(cli.AdapterOptions)} & set(meta_fields) == set()


OLD_FLAGS = {  # flag of the argparse CLI -> (MetaTrainingArguments field, value, parsed value)
    "--steps": ("max_steps", "7", 7),
    "--batch-size": ("inner_batch_size", "3", 3),
    "--adapt-steps": ("adaptation_steps", "4", 4),
    "--adapt-lr": ("adaptation_learning_rate", "0.002", 0.002),
    "--num-samples": ("eval_num_samples", "5", 5),
    "--max-query": ("eval_max_query", "6", 6),
    "--inner-lr": ("inner_learning_rate", "0.003", 0.003),
    "--tasks-per-update": ("gradient_accumulation_steps", "2", 2),
    "--resume": ("resume_from_checkpoint", "latest", "latest"),
}


def test_old_and_hf_flag_spellings_set_the_same_fields() -> None:
    defaults = cli.parse_args(["train", "--tasks", "t"]).meta
    old = cli.parse_args(["train", "--tasks", "t", *(s for flag, (_, v, _) in OLD_FLAGS.items() for s in (flag, v))])
    hf = cli.parse_args(["train", "--tasks", "t", *(s for _, (n, v, _) in OLD_FLAGS.items() for s in (f"--{n}", v))])
    for flag, (name, _, value) in OLD_FLAGS.items():
        assert getattr(old.meta, name) == getattr(hf.meta, name) == value != getattr(defaults, name), flag
    assert old.given == hf.given == {"tasks", *(name for name, _, _ in OLD_FLAGS.values())}
    evaluate = ["evaluate", "--tasks", "t", "--batch-size", "3", "--adapt-lr", "0.002", "--max-query", "6"]
    meta = cli.parse_args([*evaluate, "--num-samples", "5", "--adapt-steps", "4", "--max-length", "64"]).meta
    assert (meta.inner_batch_size, meta.adaptation_learning_rate, meta.eval_max_query) == (3, 0.002, 6)
    assert (meta.eval_num_samples, meta.adaptation_steps, meta.max_length) == (5, 4, 64)


def test_save_and_eval_steps_alone_switch_on_step_strategies() -> None:
    meta = cli.parse_args(["train", "--tasks", "t"]).meta
    assert (meta.save_strategy, meta.eval_strategy) == ("no", "no")
    meta = cli.parse_args(["train", "--tasks", "t", "--save-steps", "10", "--eval-steps", "5"]).meta
    assert (meta.save_strategy, meta.save_steps, meta.eval_strategy, meta.eval_steps) == ("steps", 10, "steps", 5)
    meta = cli.parse_args(["train", "--tasks", "t", "--save-steps", "10", "--save_strategy", "no"]).meta
    assert (meta.save_strategy, meta.save_steps) == ("no", 10)  # an explicit strategy wins


def test_demo_budget_and_adapter_config() -> None:
    quick, full = cli.parse_args(["demo", "--quick"]), cli.parse_args(["demo"])
    assert (quick.meta.max_steps, quick.meta.eval_max_query, full.meta.max_steps, full.meta.eval_max_query) == (
        4,
        8,
        24,
        32,
    )
    assert (full.meta.learning_rate, full.meta.save_strategy, full.meta.max_length, full.meta.seed) == (
        1e-3,
        "no",
        256,
        0,
    )
    assert full.options.methods == ["pretrained", "regular_lora", "abmll"]
    assert full.abmll_config == ABMLLConfig(task_type="CAUSAL_LM")
    config = cli.parse_args(["train", "--tasks", "t", "--scale-type", "softplus", "--beta", "0.5"]).abmll_config
    assert (config.scale_type, config.sampling, config.beta, config.r) == ("softplus", "weight", 0.5, 8)


def test_training_arguments_options_reach_train(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    """An option of TrainingArguments the old CLI lacked reaches the MetaTrainingArguments `train_method` gets."""

    class Stop(Exception):
        pass

    seen = {}

    def capture(method, model_fn, tokenizer, tasks, margs, config, **kwargs):
        seen.update(method=method, tasks=sorted(tasks), margs=margs, config=config, kwargs=kwargs)
        raise Stop

    monkeypatch.setattr(cli, "train_method", capture)
    argv = ["train", "--model", fake.model, "--tasks", fake.local, "--method", "reptile", "--resume", "latest"]
    with pytest.raises(Stop):
        cli.main([*argv, "--warmup_steps", "2", "--weight-decay", "0.1", "--lr_scheduler_type", "constant"])
    margs = seen["margs"]
    assert isinstance(margs, MetaTrainingArguments) and seen["method"] == "reptile" and seen["tasks"] == ["local_words"]
    assert (margs.warmup_steps, margs.weight_decay, margs.lr_scheduler_type) == (2, 0.1, "constant")
    assert (margs.max_steps, margs.learning_rate, margs.logging_steps, margs.seed, margs.max_length) == (
        100,
        1e-3,
        5,
        0,
        512,
    )
    assert seen["kwargs"] == {"resume_from_checkpoint": True}  # 'latest': the newest complete checkpoint


# ----------------------------------------------------------------------------------------------- errors
def _one_error_line(capsys: pytest.CaptureFixture, argv: list[str], status: int = 2) -> str:
    """Run `argv`; expect exit `status` and exactly one line on stderr, no traceback; return that line."""
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the tasks loaded before the error draw bars on stderr
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    err = capsys.readouterr().err
    assert code == status, err
    messages = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "/s]" not in line]
    assert "Traceback" not in err and len(messages) == 1, err  # one line (besides progress bars of the asset index)
    return messages[0].strip()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--tasks", "t", "--steps", "-3"], "--steps must be a positive number of episodes"),
        (["train", "--tasks", "t", "--max_steps", "0"], "--steps must be a positive number of episodes"),
        (["demo", "--steps", "0"], "--steps must be a positive number of episodes"),
        (["train", "--tasks", "t", "--inner-lr", "nan"], "--inner-lr must be a finite number > 0, got nan"),
        (["train", "--tasks", "t", "--learning_rate", "inf"], "--learning-rate must be a finite number > 0, got inf"),
        (["evaluate", "--tasks", "t", "--adapt-lr", "-1"], "--adapt-lr must be a finite number > 0, got -1.0"),
        (["train", "--tasks", "t", "--method", "nope"], "argument --method: invalid choice: 'nope'"),
        (["demo", "--methods", "abmll", "nope"], "--methods: invalid choice 'nope'"),
        (["adapt", "--adapter", "a", "--task", "t", "--support", "0"], "--support must be >= 1, got 0"),
        (["train", "--tasks", "t", "--max-length", "0"], "max_length=0 must be >= 1"),  # MetaTrainingArguments
        (["train", "--tasks", "t", "--r", "0"], "ABMLLConfig: invalid r=0"),  # ABMLLConfig
        (["train", "--tasks", "t", "--scale-type", "softplus", "--sampling", "local"], "sampling='local' needs"),
        (["evaluate", "--tasks", "t", "--steps", "3"], "unrecognized arguments: --steps 3"),
    ],
)
def test_bad_values_stop_before_loading(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from peft_abmll import experiment

    for name in ("load_causal_lm", "resolve_tasks"):
        monkeypatch.setattr(experiment, name, lambda *a, **k: pytest.fail("loaded before the values were checked"))
    line = _one_error_line(capsys, argv)
    assert line.startswith("abmll") and ": error: " in line and message in line, line


def test_debug_shows_the_dataclasses_errors() -> None:
    with pytest.raises(ValueError, match="max_length=0 must be >= 1"):
        cli.main(["train", "--tasks", "t", "--max-length", "0", "--debug"])


def test_malformed_task_files_name_file_and_line(tmp_path: Path) -> None:
    from peft_abmll.assets import load_task_file

    good = json.dumps({"question": "q", "choices": ["a", "b"], "label": 0})
    jsonl = _write(tmp_path / "tasks.jsonl", f'{good}\n\n{{"question": "q" "choices": []}}\n')
    with pytest.raises(ValueError, match=r"tasks\.jsonl line 3: not valid JSON \(Expecting ',' delimiter, column 18\)"):
        load_task_file(jsonl)
    whole = _write(tmp_path / "tasks.json", f'[\n{good},\n{{"question": "q",, "label": 0}}\n]')
    with pytest.raises(ValueError, match=r"tasks\.json line 3: not valid JSON \(Expecting property name"):
        load_task_file(whole)


def test_command_errors_are_one_line(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Unknown task, malformed task file, missing adapter: one line, exit 2, before the model loads."""
    from peft_abmll import experiment

    jsonl = _write(tmp_path / "bad.jsonl", '{"question": "q", "choices": ["a", "b"], "label": 0}\n{"question"}\n')
    missing = str(tmp_path / "no-adapter")
    cases = [
        (["train", "--tasks", "colours", "nope"], "Unknown BIG-bench task 'nope'"),
        (["evaluate", "--tasks", jsonl], f"{jsonl} line 2: not valid JSON (Expecting ':' delimiter, column 12)"),
        (["evaluate", "--tasks", fake.local, "--adapter", missing], f"--adapter {missing}: Can't find"),
        (["adapt", "--task", "held_out", "--adapter", missing], f"--adapter {missing}: Can't find"),
    ]
    monkeypatch.setattr(experiment, "load_causal_lm", lambda *a: pytest.fail("model loaded before the error"))
    for argv, message in cases:
        line = _one_error_line(capsys, [*argv, "--model", fake.model])
        assert line.startswith(f"abmll {argv[0]}: error: ") and message in line, line
        with pytest.raises(ValueError, match=re.escape(message)):
            cli.main([*argv, "--model", fake.model, "--debug"])
        capsys.readouterr()  # the progress bars of the tasks loaded before the error


def test_non_finite_loss_exits_1(fake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from peft_abmll.algorithms import NonFiniteLossError

    def diverge(*args, **kwargs):
        raise NonFiniteLossError("non-finite loss (nan) at step 3, task 'local_words'")

    monkeypatch.setattr(cli, "train_method", diverge)
    argv = ["train", "--model", fake.model, "--tasks", fake.local]
    assert _one_error_line(capsys, argv, status=1) == (
        "abmll train: error: non-finite loss (nan) at step 3, task 'local_words'"
    )
    with pytest.raises(NonFiniteLossError):
        cli.main([*argv, "--debug"])

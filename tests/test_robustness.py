"""Robustness: bad input, interrupted runs and untrusted files (the table in docs/robustness.md).

Cases already covered elsewhere are not repeated here; docs/robustness.md points to those tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from _index import serve
from _models import TESTS_DIR, VOCAB, llama_config, make_inputs
from _tasks import task_family, tiny_lm, tiny_tokenizer
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import peft_abmll
from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments, NonFiniteLossError, TaskEncoder, files
from peft_abmll.assets import bigbench
from peft_abmll.data import EpisodeDataset, prepare_tasks
from peft_abmll.files import save_pretrained_atomic
from peft_abmll.meta.checkpoints import (
    CHECKPOINT_MARKER,
    checkpoint_problem,
    last_complete_checkpoint,
)
from peft_abmll.pickle_policy import ALLOW_PICKLE_ENV, PickleRefusedError, allow_pickle

Inputs = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def family() -> Dataset:
    return task_family(num_tasks=4, per_task=24, seed=0)


def _args(out: Path, **kwargs: object) -> MetaTrainingArguments:
    defaults: dict[str, object] = dict(
        output_dir=str(out),
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-2,
        inner_learning_rate=1e-2,
        inner_steps=2,
        seed=0,
        disable_tqdm=True,
    )
    return MetaTrainingArguments(**{**defaults, **kwargs})  # type: ignore[arg-type]


def _trainer(tok, data, out: Path, cls: type = MetaTrainer, callbacks=None, **kwargs: object) -> MetaTrainer:
    torch.manual_seed(0)
    model = get_peft_model(tiny_lm(tok, seed=0), ABMLLConfig())
    return cls(model=model, args=_args(out, **kwargs), train_dataset=data, processing_class=tok, callbacks=callbacks)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _rows(task: str = "t", n: int = 3, **override: object) -> list[dict]:
    rows = [{"task": task, "question": f"q{i}", "choices": ["red", "blue"], "label": i % 2} for i in range(n)]
    rows[0].update(override)
    return rows


def _saved_base(path: Path, **overrides: object) -> LlamaForCausalLM:
    """A tiny Llama (`_models.llama_config` + overrides) saved to `path` and loaded back (`name_or_path` = `path`)."""
    if not path.exists():
        kwargs = dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**{**kwargs, **overrides})).save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path).eval()


def llama_like() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


class Payload:
    """A pickle that would create `marker` when unpickled by a plain (unsafe) unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------------- bad input: data
def test_empty_task_is_rejected_naming_it(tok, tmp_path: Path) -> None:
    empty = Dataset.from_dict({"question": [], "choices": [], "label": []})
    with pytest.raises(ValueError, match=r"Task 'empty' is empty"):
        prepare_tasks({"good": Dataset.from_list(_rows()), "empty": empty})
    with pytest.raises(ValueError, match=r"Task 'empty' is empty"):
        MetaTrainer(
            model=get_peft_model(tiny_lm(tok), ABMLLConfig()),
            args=_args(tmp_path),
            train_dataset={"empty": empty},
            processing_class=tok,
        )


def test_task_too_small_for_an_episode_is_skipped_or_rejected(tok, caplog: pytest.LogCaptureFixture) -> None:
    # K=2 support batches of 2 examples: an episode needs 4 distinct examples
    tasks = prepare_tasks(Dataset.from_list(_rows("big", 6) + _rows("small", 3)))
    with caplog.at_level(logging.WARNING, logger="peft_abmll"):
        episodes = EpisodeDataset(tasks, TaskEncoder(tok), support_batches=2, batch_size=2)
    assert episodes.names == ["big"]
    assert "Task 'small' has 3 examples but an episode needs 4; skipped." in caplog.text
    with pytest.raises(ValueError, match=r"No task has the 4 examples an episode needs"):
        EpisodeDataset({"small": tasks["small"]}, TaskEncoder(tok), support_batches=2, batch_size=2)


def test_too_many_choices_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    wide = {"task": "t", "question": "q", "choices": list("abcde"), "label": 4}
    only_wide = {"task": "w", "question": "q", "choices": list("abcde"), "label": 0}
    with caplog.at_level(logging.WARNING, logger="peft_abmll"):
        tasks = prepare_tasks(Dataset.from_list([*_rows("t", 2), wide, only_wide]), max_choices=4)
    assert list(tasks) == ["t"] and len(tasks["t"]) == 2
    assert "Task 't': dropped 1 example(s) with more than 4 choices." in caplog.text
    assert "Task 'w': no example left with at most 4 choices; task skipped." in caplog.text


@pytest.mark.parametrize(
    "label,why",
    [
        (None, "label must be the integer index"),
        (2, "label 2 is out of range for 2 choices"),
        (-1, "label -1 is out of range"),
        ("B", "label must be the integer index"),
        (True, "label must be the integer index"),
        (1.0, "label must be the integer index"),
    ],
)
def test_missing_or_out_of_range_label_names_task_and_row(label: object, why: str) -> None:
    good = _rows("t", 2)
    bad = {"task": "t", "question": "q", "choices": ["red", "blue"], "label": label}
    rows = [good[0], good[1], bad] if isinstance(label, int) and not isinstance(label, bool) else [bad]
    with pytest.raises(ValueError, match=rf"Task 't', row {len(rows) - 1}: {why}"):
        prepare_tasks(Dataset.from_list(rows))


def test_missing_label_column_lists_the_expected_columns() -> None:
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['label'\]"):
        prepare_tasks(Dataset.from_list([{"task": "t", "question": "q", "choices": ["a", "b"]}]))


def test_tokenizer_without_pad_token_pads_with_eos_masked(
    family: Dataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tok = tiny_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    with caplog.at_level(logging.WARNING, logger="peft_abmll"):
        encoder = TaskEncoder(tok)
    assert f"padding with token id {tok.eos_token_id}" in caplog.text
    examples = prepare_tasks(family)["t0"]
    batch = encoder.collate([encoder.encode(examples[0]), encoder.encode({**examples[1], "question": "cat is a dog"})])
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["input_ids"][padded] == tok.eos_token_id).all()
    assert (batch["labels"][padded] == -100).all()
    trainer = _trainer(tok, family, tmp_path / "out", max_steps=1)  # trains end to end without a pad token
    assert math.isfinite(trainer.train().training_loss)


def test_long_prompt_is_cut_from_the_left_never_the_answer(tok) -> None:
    example = {"question": "cat is", "choices": ["red", "blue", "green"], "label": 2, "context": "dog " * 200}
    encoder = TaskEncoder(tok, max_length=24)
    answer = encoder.answer_ids(example)
    encoded = encoder.encode(example, shots=[example] * 3)
    assert len(encoded["input_ids"]) == 24
    assert encoded["input_ids"][-len(answer) :] == answer and encoded["labels"][-len(answer) :] == answer
    assert set(encoded["labels"][: -len(answer)]) == {-100}
    full_prompt = encoder.prompt_ids(example)  # shots dropped first, then the prompt cut from the left
    assert encoded["input_ids"][: -len(answer)] == full_prompt[-(24 - len(answer)) :]
    with pytest.raises(ValueError, match=r"max_length=\d+ leaves no room for a prompt"):
        TaskEncoder(tok, max_length=len(answer)).encode(example)


# ----------------------------------------------------------------------------------------------- bad input: model
def test_target_modules_matching_nothing_are_named(tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"Target modules \{'no_such_proj'\} not found in the base model"):
        get_peft_model(tiny_llama, ABMLLConfig(target_modules=["no_such_proj"]))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tok, family: Dataset, tmp_path: Path) -> None:
    class PoisonAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:  # checkpoint-2 is written: the next step goes wrong
                with torch.no_grad():
                    trainer.view.global_params()[0].fill_(float("nan"))

    out = tmp_path / "out"
    trainer = _trainer(tok, family, out, max_steps=4, save_strategy="steps", save_steps=2, callbacks=[PoisonAtStep3()])
    with pytest.raises(NonFiniteLossError, match=r"at global step 2 at inner step 1 on task 't\d'"):
        trainer.train()
    assert last_complete_checkpoint(out) == out / "checkpoint-2" and not (out / "checkpoint-4").exists()
    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_parameters_are_never_checkpointed(tok, family: Dataset, tmp_path: Path) -> None:
    class PoisonAfterStep4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:  # after the update, before the step-4 save
                with torch.no_grad():
                    trainer.view.global_params()[3].fill_(float("inf"))

    out = tmp_path / "out"
    trainer = _trainer(
        tok, family, out, max_steps=4, save_strategy="steps", save_steps=2, callbacks=[PoisonAfterStep4()]
    )
    with pytest.raises(NonFiniteLossError, match=r"abmll_global_.*non-finite at global step 4 after task 't\d'"):
        trainer.train()
    assert last_complete_checkpoint(out) == out / "checkpoint-2" and not (out / "checkpoint-4").exists()


# ----------------------------------------------------------------------------------------------- bad input: adapters
def test_adapter_on_a_base_model_of_another_size_names_both(tmp_path: Path) -> None:
    small = _saved_base(tmp_path / "base-32")
    torch.manual_seed(1)
    get_peft_model(small, ABMLLConfig()).save_pretrained(tmp_path / "adapter")
    wide = _saved_base(tmp_path / "base-48", hidden_size=48, intermediate_size=96)
    pattern = (
        rf"trained on base model {re.escape(repr(str(tmp_path / 'base-32')))} .* loaded into, "
        rf"{re.escape(repr(str(tmp_path / 'base-48')))}: base_model\.model\.model\.layers\.0\.self_attn\.\w+_proj\."
        r"abmll_\w+\.default has shape \[(8, 32|32, 8)\] in the checkpoint but \[(8, 48|48, 8)\] in the model "
        r"\(and \d+ more mismatching"
    )
    with pytest.raises(ValueError, match=pattern):
        PeftModel.from_pretrained(wide, tmp_path / "adapter")
    deeper = _saved_base(tmp_path / "base-3-layers", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"base-3-layers'.* are not in the checkpoint, e\.g\. .*layers\.2\."):
        PeftModel.from_pretrained(deeper, tmp_path / "adapter")
    torch.manual_seed(1)
    get_peft_model(_saved_base(tmp_path / "base-3-layers"), ABMLLConfig()).save_pretrained(tmp_path / "adapter-3")
    with pytest.raises(ValueError, match=r"base-3-layers'.*base-32'.* no matching layer, e\.g\. .*layers\.2\."):
        PeftModel.from_pretrained(_saved_base(tmp_path / "base-32"), tmp_path / "adapter-3")


def test_adapter_state_dict_of_another_rank_is_refused(tiny_llama: torch.nn.Module) -> None:
    torch.manual_seed(0)
    rank4 = get_peft_model_state_dict(get_peft_model(llama_like(), ABMLLConfig(r=4)))
    model = get_peft_model(tiny_llama, ABMLLConfig(r=8))
    with pytest.raises(ValueError, match=r"has shape \[4, 32\] in the checkpoint but \[8, 32\] in the model"):
        set_peft_model_state_dict(model, rank4)


def test_config_from_a_newer_version_loads_with_a_warning(tmp_path: Path) -> None:
    base = _saved_base(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(base, ABMLLConfig(init_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hyper_prior_kind": "horseshoe", "zz_new_flag": True}))
    inputs = make_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    with pytest.warns(UserWarning, match=r"\['hyper_prior_kind', 'zz_new_flag'\] that peft-abmll .* does not know"):
        loaded = PeftModel.from_pretrained(_saved_base(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['hyper_prior_kind', 'zz_new_flag'\]"):
        assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), ABMLLConfig)  # PEFT's own path
    config_path.write_text(json.dumps({**config, "r": -3}))  # a known key with a bad value is still rejected
    with pytest.raises(ValueError, match=r"invalid r=-3"):
        PeftModel.from_pretrained(_saved_base(tmp_path / "base"), tmp_path / "adapter")


# A valid config (any subset of fields, wide ranges), then up to three fields overwritten with values of any type:
# None, bools, ints, strings, lists, floats of magnitude 1e-6..1e3, 0, nan and +-inf.
_VALID = {
    "r": st.integers(1, 40),
    "lora_alpha": st.floats(1e-3, 1e3),
    "lora_dropout": st.floats(0.0, 0.9),
    "scale_floor": st.floats(1e-8, 1e-4),
    "init_std": st.floats(1e-3, 1.0),
    "beta": st.floats(0.0, 1e3),
    "prior_a0": st.floats(1e-3, 1e3),
    "prior_b0": st.floats(1e-3, 1e3),
    "prior_mean_std": st.floats(1e-3, 1e3),
    "num_samples": st.integers(1, 4),
    "sample_seed": st.integers(-(2**63), 2**63),
    "init_weights": st.booleans(),
    "fan_in_fan_out": st.booleans(),
    "scale_type": st.sampled_from(["linear", "softplus"]),
    "sampling": st.sampled_from(["local", "weight"]),
    "predictive_mode": st.sampled_from(["mean", "sample"]),
    "posterior": st.sampled_from(["global", "local"]),
    "bias": st.sampled_from(["none", "all", "abmll_only"]),
    "target_modules": st.sampled_from([["q_proj"], "q_proj|v_proj", ".*proj", ["q_proj", "up_proj", "lm_head"]]),
    "exclude_modules": st.sampled_from([None, ["o_proj"], "nothing"]),
    "layers_to_transform": st.sampled_from([None, 0, [1], [0, 1]]),
    "modules_to_save": st.sampled_from([None, ["lm_head"]]),
}
_FLOATS = st.one_of(st.floats(1e-6, 1e3), st.floats(-1e3, -1e-6), st.sampled_from([0.0, math.nan, math.inf, -math.inf]))
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    _FLOATS,
    st.text(max_size=3),
    st.lists(st.integers(-1, 3), max_size=2),
    st.sampled_from(["local", "mean", "global", "none", "q_proj", [], ["nope"], ["q_proj", 3], ["embed_tokens"], [7]]),
)
_OVERRIDES = st.lists(st.tuples(st.sampled_from(sorted(_VALID)), _ANY), max_size=3)


@pytest.mark.filterwarnings("ignore:.*fan_in_fan_out:UserWarning", "ignore:You have passed exclude_modules:UserWarning")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_VALID), _OVERRIDES)
def test_fuzzed_config_values_work_or_raise_value_error(
    valid: dict[str, object], overrides: list[tuple[str, object]]
) -> None:
    kwargs = {**valid, **dict(overrides)}
    if kwargs.get("scale_type") == "softplus" and "sampling" not in dict(overrides):
        kwargs["sampling"] = "weight"  # keep the valid part valid: softplus needs weight sampling
    try:
        config = ABMLLConfig(**kwargs)  # type: ignore[arg-type]
        model = get_peft_model(llama_like(), config)
    except ValueError as error:
        event(f"rejected: {str(error).split('=')[0][:40]}")
        return
    event("accepted" + (" with overrides" if overrides else ""))
    inputs = make_inputs(seq=4)
    for mode in (model.eval, model.train):
        mode()
        out = model(**inputs, labels=inputs["input_ids"])
        assert torch.isfinite(out.logits).all(), kwargs
    loss = out.loss + config.beta * (model.kl_divergence() - model.log_prior())
    assert torch.isfinite(loss), kwargs
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()), kwargs


# ----------------------------------------------------------------------------------------------- faults: checkpoints
class FailingSave(MetaTrainer):
    """Raises inside the step-4 save, after the adapter (but not the optimizer / RNG / trainer state) is written."""

    def _save_rng_state(self, output_dir: str) -> None:
        if self.state.global_step == 4:
            raise OSError("disk full (simulated)")
        super()._save_rng_state(output_dir)


def test_interrupted_save_keeps_the_previous_checkpoint_and_resume_uses_it(
    tok, family: Dataset, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    snapshots: dict[str, dict[str, str]] = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            snapshots[f"checkpoint-{state.global_step}"] = _digest(out / f"checkpoint-{state.global_step}")

    common = dict(max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer = _trainer(tok, family, out, cls=FailingSave, callbacks=[Snapshot()], **common)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    ckpt2, ckpt4 = out / "checkpoint-2", out / "checkpoint-4"
    assert _digest(ckpt2) == snapshots["checkpoint-2"]  # untouched, rotation did not delete it
    assert (ckpt4 / "adapter_model.safetensors").is_file() and not (ckpt4 / "trainer_state.json").exists()
    assert "no abmll_checkpoint.json" in str(checkpoint_problem(ckpt4))
    assert get_last_checkpoint(str(out)) == str(ckpt4)  # what plain transformers would resume from
    assert last_complete_checkpoint(out) == ckpt2

    resumed = _trainer(tok, family, out, **common)
    with pytest.raises(ValueError, match=r"checkpoint-4: it is incomplete, it has no abmll_checkpoint.json"):
        resumed.train(resume_from_checkpoint=str(ckpt4))
    loaded: list[str] = []
    real_load = resumed._load_from_checkpoint
    resumed._load_from_checkpoint = lambda path, *a, **k: loaded.append(path) or real_load(path, *a, **k)  # type: ignore[method-assign]
    resumed.train(resume_from_checkpoint=True)
    assert loaded == [str(ckpt2)] and resumed.state.global_step == 4
    assert checkpoint_problem(ckpt4) is None and not ckpt2.exists()  # rotated only once checkpoint-4 was complete
    assert sorted(p.name for p in ckpt4.iterdir() if p.suffix in (".bin", ".safetensors")) == [
        "adapter_model.safetensors",
        "training_args.bin",
    ]  # adapter weights as safetensors; training_args.bin is written by transformers and never read back


_RUN = """
import os, sys, time
import torch
from peft import get_peft_model
from safetensors.torch import save_file
from _tasks import task_family, tiny_lm, tiny_tokenizer
from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments
from peft_abmll.meta.checkpoints import CheckpointSafetyMixin

out, mode = sys.argv[1], sys.argv[2]
assert issubclass(MetaTrainer, CheckpointSafetyMixin)

class Run(MetaTrainer):
    def _save_optimizer_and_scheduler(self, output_dir):
        if mode == "hang" and self.state.global_step == 4:  # the adapter of checkpoint-4 is on disk, nothing else
            open(os.path.join(out, "saving-4"), "w").close()
            time.sleep(600)
        super()._save_optimizer_and_scheduler(output_dir)

tok = tiny_tokenizer()
model = get_peft_model(tiny_lm(tok, seed=0), ABMLLConfig())
args = MetaTrainingArguments(
    output_dir=out, max_steps=6, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, logging_steps=1,
    learning_rate=1e-2, inner_learning_rate=1e-2, inner_steps=2, seed=0, disable_tqdm=True,
)
trainer = Run(model=model, args=args, train_dataset=task_family(4, 24, seed=0), processing_class=tok)
trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
save_file({str(i): p.detach().contiguous() for i, p in enumerate(trainer.view.global_params())},
          os.path.join(out, "global.safetensors"))
"""


def _start(script: Path, out: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(script), str(out), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen[str], timeout: float = 180) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


@pytest.mark.slow  # three fresh interpreters: ~20-30 s
def test_sigkill_mid_save_then_resume_gives_the_uninterrupted_adapter(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    full = _start(script, full_out, "full")
    killed = _start(script, killed_out, "hang")
    try:
        deadline = time.monotonic() + 150
        while not (killed_out / "saving-4").exists():
            assert killed.poll() is None, killed.communicate()[0]
            assert time.monotonic() < deadline, "the run never reached the step-4 save"
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL
    half_written = killed_out / "checkpoint-4"
    assert (half_written / "adapter_model.safetensors").is_file() and not (half_written / "optimizer.pt").exists()
    assert get_last_checkpoint(str(killed_out)) == str(half_written)  # what plain transformers would resume from
    assert last_complete_checkpoint(killed_out) == killed_out / "checkpoint-2"
    resumed = _start(script, killed_out, "resume")
    _finish(full)
    assert "Skipping incomplete checkpoint " + str(killed_out / "checkpoint-4") in _finish(resumed)
    expected, got = load_file(full_out / "global.safetensors"), load_file(killed_out / "global.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    assert last_complete_checkpoint(killed_out) == killed_out / "checkpoint-6"
    assert checkpoint_problem(killed_out / "checkpoint-4") is None  # redone from scratch by the resumed run


def test_interrupted_adapter_save_keeps_the_previous_adapter(
    tiny_llama: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama, ABMLLConfig(init_weights=False))
    target = tmp_path / "adapter"
    save_pretrained_atomic(model, target)
    before = _digest(target)
    with torch.no_grad():
        model.global_parameters()[0].add_(1.0)
    import peft.peft_model

    def torn_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)  # a few bytes, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(peft.peft_model, "safe_save_file", torn_write)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomic(model, target)
    assert _digest(target) == before and sorted(os.listdir(tmp_path)) == ["adapter"]
    monkeypatch.undo()
    save_pretrained_atomic(model, target)
    assert _digest(target)["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


# ----------------------------------------------------------------------------------------------- faults: assets
def _archive(path: Path) -> Path:
    task = {"examples": [{"input": f"Q{i}", "target_scores": {"no": 0, "yes": 1}} for i in range(3)]}
    with tarfile.open(path, "w:gz") as tar:
        data = json.dumps(task).encode()
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/alpha/task.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_interrupted_archive_fetch_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache"))
    data = _archive(tmp_path / "served.tar.gz").read_bytes()
    monkeypatch.setattr(bigbench, "ARCHIVE_SHA256", hashlib.sha256(data).hexdigest())
    pip_calls: list[list[str]] = []

    def pip(cmd: list[str], check: bool) -> None:  # the fallback fails too (no network for pip)
        pip_calls.append(cmd)
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(bigbench.subprocess, "run", pip)
    with serve({bigbench.ARCHIVE_NAME: data}) as index:
        monkeypatch.setenv("PEFT_ABMLL_INDEX_URL", index.url)
        index.truncate = len(data) // 2  # the connection drops mid-download
        with pytest.raises(RuntimeError, match=r"Could not fetch bigbench-1\.0\.0\.tar\.gz"):
            bigbench.bigbench_archive()
        downloads = tmp_path / "cache" / "downloads"
        assert os.listdir(downloads) == []  # the partial file was never moved into place
        index.truncate = None
        path = bigbench.bigbench_archive()
    assert len(pip_calls) == 1 and path.read_bytes() == data and os.listdir(downloads) == [path.name]


def test_damaged_asset_cache_is_detected_and_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache"))
    archive = _archive(tmp_path / "bigbench-1.0.0.tar.gz")
    expected = bigbench.load_bigbench_task("alpha", archive=archive)[:]
    data_dir = bigbench._data_dir(archive)
    parquet = data_dir / f"tasks-v{bigbench.CONVERSION_VERSION}" / "alpha.parquet"
    index = data_dir / "index.json"
    parquet.write_bytes(parquet.read_bytes()[:20])  # truncated: e.g. written by a version without atomic writes
    index.write_text(index.read_text()[:15])
    leftover = data_dir / ".index.json.tmp-killed"  # temp file of a writer killed mid-write
    leftover.write_text("{")
    os.utime(leftover, (0, 0))
    with caplog.at_level(logging.WARNING, logger="peft_abmll"):
        assert bigbench.load_bigbench_task("alpha", archive=archive)[:] == expected
    assert "index.json is damaged" in caplog.text and "alpha.parquet is damaged" in caplog.text
    assert json.loads(index.read_text())["tasks"]["alpha"]["mc"] is True
    assert not leftover.exists()
    # the SmolLM2 conversion: tests/test_assets.py::test_smollm2_interrupted_conversion_is_redone


# ----------------------------------------------------------------------------------------------- untrusted files
@pytest.fixture(name="pickled_adapter")
def _pickled_adapter(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    base_dir = tmp_path / "base"
    base = _saved_base(base_dir)
    torch.manual_seed(1)
    model = get_peft_model(base, ABMLLConfig(init_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    with torch.no_grad():
        logits = model(**make_inputs()).logits
    return tmp_path / "adapter", base_dir, logits


def test_pickle_adapter_is_refused_unless_opted_in(pickled_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter, base_dir, logits = pickled_adapter
    with pytest.raises(PickleRefusedError, match=r"adapter_model.bin.*allow_pickle\(\).*PEFT_ABMLL_ALLOW_PICKLE=1"):
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter)
    with allow_pickle():
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        assert torch.equal(model(**make_inputs()).logits, logits)
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    assert PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter) is not None


def test_opted_in_pickle_still_cannot_run_code(pickled_adapter, tmp_path: Path) -> None:
    adapter, base_dir, _ = pickled_adapter
    marker = tmp_path / "pwned"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": Payload(marker)}, protocol=2))
    with allow_pickle(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter)
    # transformers' own adapter loader reads files itself (no PEFT call to guard); 5.23 looks only for the
    # safetensors file in a local folder, and would read a .bin with weights_only=True
    with pytest.raises((FileNotFoundError, pickle.UnpicklingError)):
        LlamaForCausalLM.from_pretrained(base_dir).load_adapter(str(adapter))
    assert not marker.exists()


def test_other_peft_methods_keep_peft_pickle_behaviour(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    get_peft_model(tiny_llama, LoraConfig(target_modules=["q_proj"])).save_pretrained(
        tmp_path / "lora", safe_serialization=False
    )
    assert PeftModel.from_pretrained(llama_like(), tmp_path / "lora") is not None


def test_checkpoint_pickles_load_weights_only(tok, family: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _trainer(tok, family, out, max_steps=2, save_strategy="steps", save_steps=2).train()
    marker = tmp_path / "pwned"
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    resumed = _trainer(tok, family, out, max_steps=4, save_strategy="steps", save_steps=2)
    # the tampered file changed size: the marker no longer vouches for the checkpoint
    with pytest.raises(ValueError, match=r"No complete checkpoint .*checkpoint-2"):
        resumed.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match=r"optimizer.pt has \d+ bytes instead of \d+"):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    (out / "checkpoint-2" / CHECKPOINT_MARKER).unlink()  # a pre-marker checkpoint: transformers' own loading
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert not marker.exists()


def test_config_and_task_files_are_data_only(tmp_path: Path) -> None:
    from peft_abmll import cli

    marker = tmp_path / "pwned"
    yaml_file = tmp_path / "options.yaml"
    yaml_file.write_text(f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    import yaml

    with pytest.raises(yaml.YAMLError):
        cli._read_config(yaml_file)
    code = f"__import__('os').system('touch {marker}')"
    rows = [{"question": code, "choices": [code, "{{7*7}}"], "label": 0, "context": "!!python/object:os.system"}]
    (tmp_path / "task.json").write_text(json.dumps(rows))
    task = peft_abmll.assets.load_task_file(tmp_path / "task.json", task="../../../escape")
    assert task[0]["question"] == code and task[0]["choices"] == [code, "{{7*7}}"]
    assert list(prepare_tasks(task)) == ["../../../escape"]  # a task name is a label, never a path
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == ["options.yaml", "task.json"]
    with pytest.raises(ValueError, match="Invalid BIG-bench task name"):
        bigbench.load_bigbench_tasks(["../../../escape"], archive=tmp_path / "missing.tar.gz")
    with pytest.raises(ValueError, match="Unsafe path component"):
        files.safe_join(tmp_path, "../escape")


# ----------------------------------------------------------------------------------------- not a causal LM
def _not_causal(kind: str, vocab: int) -> torch.nn.Module:
    import transformers

    small = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=vocab)
    if kind == "seq2seq":
        config = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=vocab)
        return transformers.T5ForConditionalGeneration(config)
    if kind == "classifier":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**small))
    return transformers.LlamaModel(transformers.LlamaConfig(**small))  # no language-model head


@pytest.mark.parametrize("kind", ["seq2seq", "classifier", "headless"])
@pytest.mark.parametrize("verb", ["MetaTrainer", "adapt", "predict_proba", "evaluate_tasks"])
def test_task_verbs_refuse_a_model_that_is_not_a_causal_lm_and_say_what_to_use(kind, verb, tmp_path):
    """T5, a BERT classifier and a bare LlamaModel are named with the reason, before any data is touched."""
    tok = tiny_tokenizer()
    model = get_peft_model(_not_causal(kind, len(tok)), ABMLLConfig(target_modules=["q", "query", "q_proj"]))
    rows = task_family(num_tasks=2, per_task=8, seed=0)
    calls = {
        "MetaTrainer": lambda: MetaTrainer(
            model=model, args=MetaTrainingArguments(output_dir=str(tmp_path), report_to=[]), processing_class=tok
        ),
        "adapt": lambda: peft_abmll.adapt(model, rows, tokenizer=tok),
        "predict_proba": lambda: peft_abmll.predict_proba(model, rows, tokenizer=tok),
        "evaluate_tasks": lambda: peft_abmll.evaluate_tasks(model, rows, tokenizer=tok),
    }
    reason = {"seq2seq": "encoder-decoder", "classifier": "task head", "headless": "without a language-model head"}
    with pytest.raises(ValueError, match=f"{verb} needs a decoder-only causal language model.*{reason[kind]}"):
        calls[verb]()
    causal = get_peft_model(tiny_lm(tok), ABMLLConfig())
    assert peft_abmll.predict_proba(causal, rows.select(range(2)), tokenizer=tok).shape == (2, 3)  # the control

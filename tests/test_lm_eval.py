"""lm-evaluation-harness: the ``abmll`` model type loads ABMLL adapters with no user code and averages S samples.

lm-eval is an optional test dependency (the `test` extra installs it); the module is skipped without it. Offline:
a tiny Llama saved to a folder and a local multiple-choice task file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tasks import tiny_lm
from peft import get_peft_model

from peft_abmll import ABMLLConfig
from peft_abmll.data import seeded_torch_rng

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional test dependency: pip install lm_eval")

TASK = """task: abmll_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def assets(tok, tmp_path_factory):
    """A base model folder, an ABMLL adapter folder (non-zero means, wide posterior) and a task folder."""
    root = tmp_path_factory.mktemp("lm_eval")
    base = tiny_lm(tok)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    with seeded_torch_rng(0):
        model = get_peft_model(tiny_lm(tok), ABMLLConfig(task_type="CAUSAL_LM", init_weights=False, init_std=0.2))
    model.save_pretrained(root / "adapter")
    rows = [
        {"question": f"the {a} is", "choices": ["red", "blue", "green"], "label": i % 3}
        for i, a in enumerate(["cat", "dog", "fish", "bird", "cow", "sun"])
    ]
    (root / "tasks").mkdir()
    (root / "tasks" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "tasks" / "abmll_tiny.yaml").write_text(TASK.format(data=root / "tasks" / "test.jsonl"))
    return root


def test_posterior_averaged_logits_are_the_log_mean_of_the_samples(assets) -> None:
    from peft_abmll.integrations.lm_eval_harness import ABMLLHarnessModel

    kwargs = {"pretrained": str(assets / "base"), "peft": str(assets / "adapter"), "device": "cpu", "batch_size": 1}
    mean = ABMLLHarnessModel(**kwargs)
    sampled = ABMLLHarnessModel(**kwargs, num_samples=3)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    tuner = sampled.model.base_model
    singles = []
    for s in range(3):
        with torch.no_grad(), tuner.posterior_sample(s):
            singles.append(torch.softmax(sampled.model(ids).logits.float(), dim=-1))
    expected = torch.stack(singles).mean(0).log()
    torch.testing.assert_close(torch.log_softmax(sampled._model_call(ids), -1), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(mean._model_call(ids), mean.model(ids).logits)  # S = 1: the posterior mean
    assert not torch.allclose(torch.log_softmax(mean._model_call(ids), -1), expected, atol=1e-3)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        ABMLLHarnessModel(**kwargs, num_samples=0)


def test_the_command_runs_the_harness_on_an_abmll_adapter_with_no_user_code(assets, tmp_path: Path) -> None:
    """A fresh interpreter: the harness's own CLI, the ``abmll`` model type, a local task, 3 posterior samples."""
    model_args = f"pretrained={assets / 'base'},peft={assets / 'adapter'},num_samples=3"
    argv = ["--model", "abmll", "--model_args", model_args, "--tasks", "abmll_tiny"]
    argv += ["--include_path", str(assets / "tasks"), "--device", "cpu", "--batch_size", "2"]
    argv += ["--output_path", str(tmp_path / "out")]
    command = [sys.executable, "-m", "peft_abmll.integrations.lm_eval_harness", *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    [found] = list((tmp_path / "out").rglob("results*.json"))
    results = json.loads(found.read_text())
    assert 0 <= results["results"]["abmll_tiny"]["acc,none"] <= 1
    args = results["config"]["model_args"]  # a dict in lm-eval 0.4.13, the argument string in older versions
    assert results["config"]["model"] == "abmll"
    assert str(args.get("num_samples")) == "3" if isinstance(args, dict) else "num_samples=3" in args

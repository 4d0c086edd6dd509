"""BIG-bench multiple-choice tasks read straight out of the ``bigbench==1.0.0`` source archive on PyPI.

The 358 MB sdist is fetched once from the package index, sha256-checked (never installed: it pulls tensorflow), into
``<cache>/downloads``. One scan of the archive builds a JSON index (task name -> offset/size of its
``task.json`` in the uncompressed tar, and whether it looks multiple choice); each converted task is
then cached as a small parquet file, so later runs touch neither the index scan nor the tar.

Task format (one row per example): ``task`` (str), ``question`` (str, the input without the task
prefix), ``context`` (str, the task's ``task_prefix`` or ""), ``choices`` (list[str]), ``label`` (int,
index of the option with the unique highest positive ``target_scores`` entry).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset
from tqdm.auto import tqdm

from ..data import _max_choices_mask
from ..files import atomic_write_bytes, atomic_write_text, safe_join
from .cache import cache_root

logger = logging.getLogger("peft_abmll")

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"  # as published on PyPI
DEFAULT_INDEX_URL = "https://pypi.org/simple"
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", BIGBENCH_REQUIREMENT]
TASKS_DIR = "bigbench/benchmark_tasks/"
TASK_NAME_RE = re.compile(r"[A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)?")
INDEX_VERSION = 1
CONVERSION_VERSION = 2  # 2: examples with a blank option are skipped
TASK_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("question", pa.string()),
        ("context", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("label", pa.int64()),
    ]
)
_SKIP_CHUNK = 8 << 20


# ----------------------------------------------------------------------------------------------- archive
def index_url() -> str:
    """The package index to fetch the sdist from: ``$PEFT_ABMLL_INDEX_URL``, ``$PIP_INDEX_URL`` or PyPI."""
    url = os.environ.get("PEFT_ABMLL_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX_URL
    return url.rstrip("/")


def _archive_url(index: str) -> str:
    """URL of `ARCHIVE_NAME` in the Simple API (PEP 691 JSON) listing of ``bigbench`` on ``index``."""
    request = urllib.request.Request(f"{index}/bigbench/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    for entry in listing.get("files", []):
        if entry.get("filename") == ARCHIVE_NAME:
            return urllib.parse.urljoin(f"{index}/bigbench/", entry["url"])
    raise RuntimeError(f"{index}/bigbench/ does not list {ARCHIVE_NAME}")


def _check_sha256(sha256: str, source: str) -> None:
    """Raise naming ``source`` if ``sha256`` is not the published `ARCHIVE_SHA256`."""
    if sha256 != ARCHIVE_SHA256:
        raise RuntimeError(f"{source}: {ARCHIVE_NAME} has sha256 {sha256}, not the published {ARCHIVE_SHA256}")


def _download_verified(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` with a progress bar; raise if its sha256 is not `ARCHIVE_SHA256`."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=ARCHIVE_NAME) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    _check_sha256(digest.hexdigest(), url)


def _pip_download(dest_dir: Path) -> None:
    """Fallback for indexes without the JSON Simple API: ``pip download`` (older pip versions only)."""
    subprocess.run([*PIP_DOWNLOAD, "-d", str(dest_dir)], check=True)
    got = dest_dir / ARCHIVE_NAME
    if not got.is_file():
        raise RuntimeError(f"pip download did not produce {ARCHIVE_NAME} (got {sorted(os.listdir(dest_dir))})")
    digest = hashlib.sha256()
    with open(got, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    _check_sha256(digest.hexdigest(), "pip download")


def _fetch(dest_dir: Path) -> Path:
    """Download `ARCHIVE_NAME` into ``dest_dir``: from the index, else with pip; raise naming both failures."""
    got = dest_dir / ARCHIVE_NAME
    try:
        _download_verified(_archive_url(index_url()), got)
        return got
    except (OSError, ValueError, RuntimeError, http.client.HTTPException) as error:
        index_error = error
    logger.warning("Index download failed (%s); trying `pip download`", index_error)
    got.unlink(missing_ok=True)
    try:
        _pip_download(dest_dir)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as pip_error:
        raise RuntimeError(
            f"Could not fetch {ARCHIVE_NAME}: from the index: {index_error}; with pip: {pip_error}. "
            f"Set PEFT_ABMLL_INDEX_URL to a reachable package index, or download the file "
            f"(sha256 {ARCHIVE_SHA256}) to {cache_root() / 'downloads' / ARCHIVE_NAME}."
        ) from pip_error
    return got


def bigbench_archive(install: bool = True) -> Path:
    """Path of the cached ``bigbench-1.0.0.tar.gz`` sdist (358 MB), downloading it if missing.

    The file comes from the package index (`index_url`, PyPI by default) and is checked against its
    published sha256. ``pip download`` is only a fallback: recent pip (26.3 here) refuses to prepare its
    metadata (it declares a direct-URL dependency), so it cannot be the main path.

    Args:
        install: allow the download; if False and the archive is not cached, raise with what to run.
    """
    downloads = cache_root() / "downloads"
    final = downloads / ARCHIVE_NAME
    if final.is_file():
        return final
    if not install:
        raise RuntimeError(
            f"The BIG-bench archive is not cached at {final}. Call bigbench_archive(install=True) to fetch it "
            f"(358 MB, sha256 {ARCHIVE_SHA256}) from {index_url()}, or place the file there yourself."
        )
    downloads.mkdir(parents=True, exist_ok=True)
    logger.warning("Downloading the %s sdist (358 MB) from %s into %s", BIGBENCH_REQUIREMENT, index_url(), downloads)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        os.replace(_fetch(Path(tmp)), final)
    return final


def validate_task_name(name: str) -> str:
    """Return ``name`` if it is ``task`` or ``task/subtask`` (letters, digits, ``_``); else raise ValueError."""
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name):
        raise ValueError(f"Invalid BIG-bench task name {name!r}: expected 'task' or 'task/subtask' ([A-Za-z0-9_]+).")
    return name


def _resolve_archive(archive: str | os.PathLike | None) -> Path:
    return bigbench_archive() if archive is None else Path(archive)


def _data_dir(archive: Path) -> Path:
    """Cache folder for everything derived from ``archive`` (keyed by its file name and size)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", archive.name.removesuffix(".gz").removesuffix(".tar"))
    return safe_join(cache_root() / "bigbench", f"{stem}-{archive.stat().st_size}")


# ----------------------------------------------------------------------------------------------- index
def task_index(archive: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Task name -> ``{"offset", "size", "mc", "examples"}`` for every ``task.json`` in the archive.

    Built by one scan of the archive (a few seconds) and cached as JSON next to the converted tasks.
    """
    archive = _resolve_archive(archive)
    path = _data_dir(archive) / "index.json"
    if path.is_file():
        cached = _read_index(path)
        if cached is not None:
            return cached
    tasks = _build_index(archive)
    payload = {"version": INDEX_VERSION, "archive": archive.name, "tasks": tasks}
    atomic_write_text(path, json.dumps(payload, indent=0, sort_keys=True))
    return tasks


def _read_index(path: Path) -> dict[str, dict[str, Any]] | None:
    """The cached index, or None (with a warning if it is damaged) when it must be rebuilt."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tasks = data["tasks"] if data.get("version") == INDEX_VERSION else None
        entries_ok = isinstance(tasks, dict) and all(
            isinstance(e, dict) and {"offset", "size", "mc", "examples"} <= set(e) for e in tasks.values()
        )
        if tasks is not None and not entries_ok:
            raise ValueError("unexpected layout")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("BIG-bench index %s is damaged (%s); rebuilding it.", path, error)
        return None
    return tasks


def _build_index(archive: Path) -> dict[str, dict[str, Any]]:
    tasks: dict[str, dict[str, Any]] = {}
    with tarfile.open(archive, "r:*") as tar, tqdm(desc="Indexing BIG-bench tasks", unit=" task.json") as bar:
        for member in tar:
            name = _task_name_of(member.name)
            if name is None or not member.isfile():
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            tasks[name] = {
                "offset": member.offset_data,
                "size": member.size,
                "mc": b'"target_scores"' in data,
                "examples": b'"examples"' in data,
            }
            bar.update()
    if not tasks:
        raise ValueError(f"{archive} holds no {TASKS_DIR}<task>/task.json: is it the bigbench sdist?")
    return tasks


def _task_name_of(member_name: str) -> str | None:
    """``task`` or ``task/subtask`` for a ``.../bigbench/benchmark_tasks/<...>/task.json`` member, else None."""
    head, sep, rest = member_name.partition(TASKS_DIR)
    if not sep or head.count("/") > 1 or not rest.endswith("/task.json"):
        return None
    name = rest.removesuffix("/task.json")
    return name if TASK_NAME_RE.fullmatch(name) else None


def _read_members(archive: Path, entries: Mapping[str, Mapping[str, int]]) -> dict[str, bytes]:
    """Bytes of several members (name -> index entry) in one forward pass over the uncompressed tar."""
    out: dict[str, bytes] = {}
    with open(archive, "rb") as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    with opener(archive, "rb") as f:
        pos = 0
        for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["offset"]):
            pos += _skip(f, entry["offset"] - pos)
            data = f.read(entry["size"])
            pos += len(data)
            if len(data) != entry["size"]:
                raise ValueError(f"{archive} ended inside task {name!r}: the archive or its index is stale/corrupt.")
            out[name] = data
    return out


def _skip(f: io.BufferedIOBase, n: int) -> int:
    done = 0
    while done < n:
        chunk = f.read(min(_SKIP_CHUNK, n - done))
        if not chunk:
            break
        done += len(chunk)
    return done


# ----------------------------------------------------------------------------------------------- conversion
def convert_task_json(name: str, task: Mapping[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Multiple-choice examples of a parsed BIG-bench ``task.json`` as task-format rows.

    Returns:
        (rows, skipped): rows with ``task, question, context, choices, label``; ``skipped`` counts
        examples without ``target_scores``, without a unique positive best option, or with a blank option
        (nothing to score or train on in the option format; e.g. one row of ``cryobiology_spanish``).
    """
    prefix = str(task.get("task_prefix") or "")
    rows, skipped = [], 0
    for example in task.get("examples") or []:
        scores = example.get("target_scores")
        if not isinstance(scores, Mapping) or len(scores) < 2:
            skipped += 1
            continue
        choices = [str(c) for c in scores]
        values = [float(v) for v in scores.values()]
        best = max(values)
        if best <= 0 or values.count(best) != 1 or not all(c.strip() for c in choices):
            skipped += 1
            continue
        question = str(example.get("input", ""))
        if prefix and question.startswith(prefix):
            question = question[len(prefix) :]
        rows.append(
            {
                "task": name,
                "question": question.strip(),
                "context": prefix.strip(),
                "choices": choices,
                "label": values.index(best),
            }
        )
    return rows, skipped


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TASK_SCHEMA)


def _leaf_table(archive: Path, index: Mapping[str, Mapping[str, Any]], names: list[str]) -> dict[str, pa.Table]:
    """Converted tables of leaf tasks ``names``: from the parquet cache, else (one tar pass for all) the archive."""
    tasks_dir = _data_dir(archive) / f"tasks-v{CONVERSION_VERSION}"
    paths = {n: safe_join(tasks_dir, n.replace("/", "__") + ".parquet") for n in names}
    tables = {n: t for n, t in ((n, _read_cached_task(p)) for n, p in paths.items()) if t is not None}
    missing = [n for n in names if n not in tables]
    if missing:
        raw = _read_members(archive, {n: index[n] for n in missing})
        for name in missing:
            rows, skipped = convert_task_json(name, json.loads(raw[name]))
            if skipped:
                what = "non-multiple-choice/ambiguous/blank-option"
                logger.info("BIG-bench task %r: skipped %d %s example(s).", name, skipped, what)
            if not rows:
                raise ValueError(f"BIG-bench task {name!r} has no multiple-choice example with a unique best option.")
            table = _rows_table(rows)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            atomic_write_bytes(paths[name], sink.getvalue().to_pybytes())
            tables[name] = table
    return tables


def _read_cached_task(path: Path) -> pa.Table | None:
    """A converted task from the cache, or None (with a warning if the file is damaged) when it must be redone."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        logger.warning("Cached BIG-bench task %s is damaged (%s); converting it again.", path, error)
        return None
    if table.column_names != TASK_SCHEMA.names:
        logger.warning("Cached BIG-bench task %s has unexpected columns; converting it again.", path)
        return None
    return table


def _leaves(name: str, index: Mapping[str, Mapping[str, Any]], archive: Path) -> list[str]:
    """The leaf tasks making up ``name``: itself, or its multiple-choice subtasks if it has no examples."""
    if name not in index:
        raise ValueError(f"Unknown BIG-bench task {name!r} (not a JSON task in {archive.name}).")
    if index[name]["examples"]:
        leaves = [name]
    else:
        leaves = sorted(n for n, e in index.items() if n.startswith(name + "/") and e["examples"])
        if not leaves:
            raise ValueError(f"BIG-bench task {name!r} has no examples and no subtasks.")
    leaves = [n for n in leaves if index[n]["mc"]]
    if not leaves:
        raise ValueError(f"BIG-bench task {name!r} is not multiple choice (its examples have no target_scores).")
    return leaves


def _filter_choices(name: str, table: pa.Table, max_choices: int | None) -> pa.Table:
    """`table` without the examples with more than `max_choices` options (`peft_abmll.data`'s rule, logged)."""
    if max_choices is None:
        return table
    counts = pc.list_value_length(table["choices"]).to_numpy()
    return table.filter(pa.array(_max_choices_mask(name, counts, max_choices)))


def _shuffle_choices(name: str, table: pa.Table, seed: int) -> pa.Table:
    """Permute each row's choices (and remap its label) with an rng fixed by ``(seed, name)``; vectorised."""
    if table.num_rows == 0:
        return table
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    choices = table["choices"].combine_chunks()
    offsets = choices.offsets.to_numpy()
    offsets = offsets - offsets[0]  # a sliced array's offsets need not start at 0
    flat = choices.flatten()
    rows = np.repeat(np.arange(table.num_rows), np.diff(offsets))
    order = np.lexsort((rng.random(len(flat)), rows))  # a random order inside each row
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    labels = position[offsets[:-1] + table["label"].to_numpy()] - offsets[:-1]
    shuffled = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat.take(pa.array(order)))
    table = table.set_column(table.schema.get_field_index("choices"), "choices", shuffled)
    return table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))


# ----------------------------------------------------------------------------------------------- public loaders
def load_bigbench_tasks(
    names: Iterable[str],
    archive: str | os.PathLike | None = None,
    max_choices: int | None = 4,
    shuffle_choices: bool = True,
    seed: int = 0,
) -> dict[str, Dataset]:
    """Several BIG-bench multiple-choice tasks (one archive pass for all uncached ones) as name -> `Dataset`.

    Arguments as in `load_bigbench_task`. A task with subtasks and no examples of its own is the
    concatenation of its multiple-choice subtasks.
    Tasks left with no example after the ``max_choices`` filter are dropped with a warning. Raises
    ValueError for an invalid/unknown name or a non-multiple-choice task.
    """
    names = [validate_task_name(n) for n in names]
    archive = _resolve_archive(archive)
    index = task_index(archive)
    leaves = {name: _leaves(name, index, archive) for name in names}
    tables = _leaf_table(archive, index, sorted({leaf for ls in leaves.values() for leaf in ls}))
    out = {}
    for name in names:
        parts = [tables[leaf] for leaf in leaves[name]]
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if len(parts) > 1:
            table = table.set_column(0, "task", pa.array([name] * table.num_rows, pa.string()))
        table = _filter_choices(name, table, max_choices)
        if table.num_rows == 0:
            logger.warning("Task %r: no example left with at most %s choices; task skipped.", name, max_choices)
            continue
        if shuffle_choices:
            table = _shuffle_choices(name, table, seed)
        out[name] = Dataset(table)
    return out


def load_bigbench_task(
    name: str,
    archive: str | os.PathLike | None = None,
    max_choices: int | None = 4,
    shuffle_choices: bool = True,
    seed: int = 0,
) -> Dataset:
    """One BIG-bench multiple-choice task (``task`` or ``task/subtask``) in the task format.

    Args:
        name: task name, e.g. ``"snarks"`` or ``"fact_checker/fever"``.
        archive: path to the bigbench sdist; default `bigbench_archive()` (downloads it once).
        max_choices: drop examples with more options (logged); None keeps all.
        shuffle_choices: permute each example's options (deterministically, from ``seed`` and the task
            name). On by default because several tasks list the correct option first (e.g. ``physics``,
            ``temporal_sequences``, ``question_selection``), which letter-label prompts would leak.
        seed: seed of that permutation.

    Returns:
        Dataset with columns ``task, question, context, choices, label`` (possibly empty after filtering).
    """
    tasks = load_bigbench_tasks([name], archive, max_choices, shuffle_choices, seed)
    return tasks[name] if name in tasks else Dataset(TASK_SCHEMA.empty_table())


def list_bigbench_tasks(archive: str | os.PathLike | None = None) -> list[str]:
    """Sorted names of the archive's multiple-choice leaf tasks (those whose examples carry ``target_scores``)."""
    index = task_index(_resolve_archive(archive))
    return sorted(n for n, e in index.items() if e["mc"] and e["examples"])

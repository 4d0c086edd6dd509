"""Few-shot adaptation to an unseen task, calibrated prediction, and held-out-task evaluation.

```python
adapt(model, support_examples, tokenizer=tok, steps=5)      # local <- global, 5 steps
probs = predict_proba(model, query_examples, tokenizer=tok)  # (n, max options), rows sum to 1
save_adapted(model, "my-task-adapter")                      # the adapted posterior as an adapter
```
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union, cast

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from transformers.utils.logging import tqdm

from .algorithms import DEFAULT_INNER_LR, SnapshotView, abmll_tuner, inner_loop, make_view, require_causal_lm
from .data import DEFAULT_ANSWER_FORMAT, LetterCollisionError, TaskEncoder, as_examples
from .files import save_pretrained_atomic
from .tuner.model import ABMLLModel

logger = logging.getLogger("peft_abmll")
Examples = Sequence[Mapping[str, Any]]


SCORINGS = ("letter", "option", "option_sum")
"""`predict_proba` scorings: option letters, options by mean or by summed token log-likelihood."""


def encoder_for(tokenizer: Any, encoder: Optional[TaskEncoder], model: Optional[nn.Module] = None) -> TaskEncoder:
    """`encoder` if given, else a `TaskEncoder` of `tokenizer` in the answer format `model`'s ABMLL adapter was
    meta-trained with (its ``training_record``), else the default format."""
    if encoder is not None:
        return encoder
    if tokenizer is None:
        raise ValueError("Pass `tokenizer=` (or a TaskEncoder as `encoder=`) to turn examples into tokens.")
    return TaskEncoder(tokenizer, answer_format=trained_answer_format(model) or DEFAULT_ANSWER_FORMAT)


def trained_answer_format(model: Optional[nn.Module]) -> Optional[str]:
    """The answer format `model`'s ABMLL adapter was meta-trained with (recorded by `MetaTrainer`), or None."""
    tuner = abmll_tuner(model) if model is not None else None
    record = (tuner.abmll_config().training_record or {}) if tuner is not None else {}
    return (record.get("meta_training") or {}).get("answer_format")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def adaptation_learning_rate(model: nn.Module) -> float:
    """The test-time rate an ABMLL adapter was meta-learned for (its config's), else `DEFAULT_INNER_LR`."""
    tuner = abmll_tuner(model)
    recorded = tuner.abmll_config().adaptation_learning_rate if tuner is not None else None
    return DEFAULT_INNER_LR if recorded is None else recorded


def adapt(
    model: nn.Module,
    support: Examples,
    *,
    tokenizer: Any = None,
    encoder: Optional[TaskEncoder] = None,
    steps: int = 5,
    batch_size: int = 2,
    lr: Optional[float] = None,
    optimizer: str = "adamw",
    beta: Optional[float] = None,
    num_shots: int = 0,
    seed: int = 0,
    task: str = "new task",
) -> list[dict[str, float]]:
    """Adapt `model` to one task from its `support` examples in `steps` gradient steps.

    ABMLL: the local posterior is reset to the global one, trained for `steps` steps on
    NLL + beta * KL(local || global), and made the active posterior (so `predict_proba`, `merge` and
    `save_pretrained` use it). Any other PeftModel: its trainable parameters are trained in place. Adapt inside
    ``with adaptation_scope(model):`` to undo the adaptation when the block ends.

    Batches cycle through the support examples in a seeded order, `batch_size` per step.
    `lr` None: the rate the ABMLL adapter was meta-learned for (`adaptation_learning_rate`, saved in its
    config by `MetaTrainer`), else `DEFAULT_INNER_LR`.

    Returns:
        One log dict per step (``nll``, ``loss``, ``kl``).
    """
    require_causal_lm(model, "adapt")
    if support is None or (hasattr(support, "__len__") and len(support) == 0):
        raise ValueError(f"Cannot adapt to task {task!r}: no support examples given.")
    support = as_examples(support, f"support examples of task {task!r}")
    lr = adaptation_learning_rate(model) if lr is None else lr
    enc = encoder_for(tokenizer, encoder, model)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(support))
    batches = []
    for s in range(steps):
        idx = [order[(s * batch_size + j) % len(support)] for j in range(batch_size)]
        batches.append(_to(enc.batch([support[i] for i in idx], support, num_shots, rng), _device(model)))
    view = make_view(model, beta)
    was_training = model.training
    model.train()
    view.begin_task()
    try:
        with view.local_mode():
            logs = inner_loop(model, view, batches, lr=lr, optimizer=optimizer, task=task, fresh=True)
    finally:
        model.train(was_training)
    view.finish_task()
    return logs


@contextlib.contextmanager
def adaptation_scope(model: nn.Module) -> Iterator[None]:
    """Undo any adaptation made inside the block (ABMLL: back to the global posterior)."""
    tuner = abmll_tuner(model)
    if tuner is None:
        snapshot = SnapshotView(model)
        try:
            yield
        finally:
            snapshot.restore()
        return
    posterior = tuner.abmll_config().posterior
    try:
        yield
    finally:
        tuner.set_posterior(posterior)
        tuner.set_trainable_posterior(posterior)
        tuner.reset_local_to_global()


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    examples: Examples,
    *,
    tokenizer: Any = None,
    encoder: Optional[TaskEncoder] = None,
    num_samples: Optional[int] = None,
    batch_size: int = 8,
    shots: Examples = (),
    num_shots: int = 0,
    seed: int = 0,
    scoring: Optional[str] = None,
    progress: bool = False,
    desc: str = "predicting",
) -> torch.Tensor:
    """Per-choice probabilities of multiple-choice examples.

    Scoring (`scoring`, default: the encoder's ``answer_format``, so what was trained is what is scored):

    - ``"letter"`` (the paper's): the option letters' next-token probabilities after the prompt,
      renormalised over the example's valid options. A tokenizer whose letters share a first token cannot
      be scored this way: option scoring is used instead, with a warning.
    - ``"option"``: each option's own text scored by its mean token log-likelihood given the prompt
      (length-normalised), softmax over the valid options; one forward per option. The usual way to rank
      options with a small model; dividing by the length flattens the probabilities of long options.
    - ``"option_sum"``: the same with the summed log-likelihood: the model's own probability of each option's
      text, renormalised over the options (what to read as a calibrated probability).

    Probabilities are averaged over `num_samples` seeded posterior samples (default: the adapter's
    ``num_samples``). With one, the adapter's ``predictive_mode`` decides: the posterior mean or one sample.

    `progress` shows a bar over the batches (labelled `desc`; off when transformers' progress bars are disabled).

    Returns:
        ``(len(examples), max choices)`` float32; invalid options are 0; rows sum to 1.
    """
    require_causal_lm(model, "predict_proba")
    enc = encoder_for(tokenizer, encoder, model)
    examples = as_examples(examples, "predict_proba examples")
    shots = as_examples(shots, "in-context examples") if num_shots > 0 and _non_empty(shots) else []
    width = max(len(e["choices"]) for e in examples)
    scoring, letter_ids = _scoring(enc, scoring, width)
    samples = _num_samples(model, num_samples)
    rng = np.random.default_rng(seed)
    chunks = [examples[start : start + batch_size] for start in range(0, len(examples), batch_size)]
    chunk_shots = [[_shots(shots, num_shots, rng) for _ in chunk] for chunk in chunks]
    inputs: list[Any]  # per chunk: its examples' option inputs (option scoring) or one letter batch
    if scoring != "letter":
        inputs = [[_option_inputs(enc, e, sh) for e, sh in zip(c, s)] for c, s in zip(chunks, chunk_shots)]
    else:
        inputs = [_letter_inputs(enc, c, s, width) for c, s in zip(chunks, chunk_shots)]
    device = _device(model)
    was_training = model.training
    model.eval()
    probs = torch.zeros(len(examples), width)
    bar = tqdm(total=len(chunks) * samples, desc=desc, unit="batch", leave=False, disable=not progress)
    try:
        for draw in _posterior_draws(model, samples):  # each sample drawn once for every example
            with draw:
                start = 0
                for chunk, chunk_inputs in zip(chunks, inputs):
                    if scoring != "letter":
                        mean = scoring == "option"
                        for i, (example, option_inputs) in enumerate(zip(chunk, chunk_inputs)):
                            option_probs = _option_probs(model, option_inputs, device, mean)
                            probs[start + i, : len(example["choices"])] += option_probs
                    else:
                        assert letter_ids is not None  # letter scoring
                        probs[start : start + len(chunk)] += _letter_probs(model, chunk_inputs, letter_ids, device)
                    start += len(chunk)
                    bar.update()
    finally:
        bar.close()
        model.train(was_training)
    return probs / samples


def _scoring(enc: TaskEncoder, scoring: Optional[str], width: int) -> tuple[str, Optional[torch.Tensor]]:
    """The scoring to use and, for letters, their token ids (falling back to options on a collision)."""
    scoring = scoring or enc.answer_format
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}; choose one of {SCORINGS}.")
    if scoring != "letter":
        return scoring, None
    try:
        return scoring, torch.tensor(enc.label_token_ids(width))
    except LetterCollisionError as err:
        logger.warning("%s Scoring by option log-likelihood instead.", err)
        return "option", None


def _option_inputs(enc: TaskEncoder, example: Mapping[str, Any], shots: Examples) -> dict[str, Any]:
    """One example's options, encoded and collated after one shared prompt (what `_option_probs` scores)."""
    encoded = enc.encode_options(example, shots)
    batch = enc.collate(encoded)
    labels = batch.pop("labels")
    width = batch["input_ids"].shape[1]
    starts = [e["prompt_length"] for e in encoded]
    keep = width - min(starts) + 1  # the positions that predict any answer token, in every row
    return {"batch": batch, "targets": labels[:, width - keep + 1 :], "keep": keep, "shared": min(starts)}


def _option_probs(model: nn.Module, inputs: dict[str, Any], device: torch.device, mean: bool = True) -> torch.Tensor:
    """``(num choices,)``: softmax of each option's mean (or summed) token log-likelihood (one forward)."""
    batch = _to(inputs["batch"], device)
    keep, targets = inputs["keep"], inputs["targets"].to(device)
    logits = _tail_logits(model, batch, keep, _shared_prefix(batch["input_ids"], inputs["shared"]))
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    answer = targets != -100
    score = (picked * answer).sum(-1)
    return torch.softmax((score / answer.sum(-1) if mean else score).cpu(), dim=-1)


def _shared_prefix(input_ids: torch.Tensor, length: int) -> int:
    """`length` when every row starts with the same `length` tokens (options after one prompt), else 0."""
    if len(input_ids) < 2 or length < 1 or not bool((input_ids[:, :length] == input_ids[:1, :length]).all()):
        return 0
    return length


def _tail_logits(model: nn.Module, batch: dict, keep: int, shared: int = 0) -> torch.Tensor:
    """``(rows, keep, vocab)`` logits of the last `keep` positions.

    With ``shared = P > 0`` (every row starts with the same ``P`` tokens and ``keep = width - P + 1``), the prefix
    is run once and its key/value cache repeated for every row, so a prompt is encoded once for all its
    options; models without a repeatable cache fall back to one full pass. Only the kept positions are
    projected onto the vocabulary when the model takes ``logits_to_keep``.
    """
    if shared and keep == batch["input_ids"].shape[1] - shared + 1:
        logits = _logits_after_shared_prefix(model, batch, shared)
        if logits is not None:
            return logits
    if _takes_logits_to_keep(model):
        logits = model(**batch, logits_to_keep=keep).logits
        if logits.shape[1] == keep:
            return logits
    return model(**batch).logits[:, -keep:]


def _logits_after_shared_prefix(model: nn.Module, batch: dict, shared: int) -> Optional[torch.Tensor]:
    """`_tail_logits` by one pass over the shared prefix and one over the rows' tails (None: no usable cache)."""
    rows = batch["input_ids"].shape[0]
    keep_last = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    prefix = model(
        input_ids=batch["input_ids"][:1, :shared],
        attention_mask=batch["attention_mask"][:1, :shared],
        use_cache=True,
        **keep_last,
    )
    cache = getattr(prefix, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(rows)
    tail = model(
        input_ids=batch["input_ids"][:, shared:],
        attention_mask=batch["attention_mask"],
        past_key_values=cache,
        use_cache=True,
    ).logits
    first = prefix.logits[:, -1:].expand(rows, 1, -1)  # predicts the first token after the prefix, in every row
    return torch.cat([first, tail], dim=1)


def _non_empty(rows: Any) -> bool:
    return rows is not None and len(rows) > 0


def _shots(pool: Examples, k: int, rng: np.random.Generator) -> list:
    if k <= 0 or not pool:
        return []
    return [pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]


def _num_samples(model: nn.Module, num_samples: Optional[int]) -> int:
    """`num_samples`, else the adapter's ``num_samples`` (1 for a model without an ABMLL adapter)."""
    tuner = abmll_tuner(model)
    if tuner is None:
        return 1
    if num_samples is None:
        return tuner.abmll_config().num_samples
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    return num_samples


def _letter_inputs(enc: TaskEncoder, chunk: Examples, shots: list, width: int) -> dict[str, Any]:
    """A batch of letter-format prompts, the position of each prompt's last token and the valid options."""
    encoded = [enc.encode(e, sh, answer_format="letter") for e, sh in zip(chunk, shots)]
    batch = enc.collate(encoded)
    batch.pop("labels")
    mask = torch.zeros(len(chunk), width, dtype=torch.bool)
    for i, e in enumerate(chunk):
        mask[i, : len(e["choices"])] = True
    return {"batch": batch, "last": torch.tensor([e["prompt_length"] - 1 for e in encoded]), "mask": mask}


def _letter_probs(
    model: nn.Module, inputs: dict[str, Any], letter_ids: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``(batch, width)``: the option letters' next-token probabilities, renormalised over the valid options."""
    logits = _logits_at(model, _to(inputs["batch"], device), inputs["last"].to(device))
    rows = logits[:, letter_ids.to(logits.device)].float().cpu()
    return torch.softmax(rows.masked_fill(~inputs["mask"], float("-inf")), dim=-1)


def _posterior_draws(model: nn.Module, samples: int) -> Iterator[contextlib.AbstractContextManager]:
    """One context per prediction pass: seeded posterior sample ``s`` (ABMLL, S > 1 or sample mode), else none."""
    tuner = abmll_tuner(model)
    sample_mode = tuner is not None and (samples > 1 or _predictive_sample(tuner))
    for s in range(samples):
        yield tuner.posterior_sample(s) if tuner is not None and sample_mode else contextlib.nullcontext()


def _logits_at(model: nn.Module, batch: dict, last: torch.Tensor) -> torch.Tensor:
    """``(batch, vocab)`` logits at position ``last[i]`` of row ``i``.

    Models whose forward takes transformers' ``logits_to_keep`` compute the vocabulary projection at those
    positions only (less time, and no ``batch x length x vocab`` tensor); others fall back to all positions.
    """
    rows = torch.arange(len(last), device=last.device)
    if _takes_logits_to_keep(model):
        keep, inverse = torch.unique(last, return_inverse=True)
        try:
            logits = model(**batch, logits_to_keep=keep).logits
        except (TypeError, IndexError, ValueError):  # a custom model that only takes an int: use all positions
            logits = None
        if logits is not None and logits.shape[1] == len(keep):
            return logits[rows, inverse]
        if logits is not None and logits.shape[1] > int(last.max()):
            return logits[rows, last]  # the model accepted but ignored the argument: all positions came back
    return model(**batch).logits[rows, last]


def _takes_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _predictive_sample(tuner: ABMLLModel) -> bool:
    return tuner.abmll_config().predictive_mode == "sample"


def save_adapted(model: nn.Module, path: Union[str, Path]) -> Path:
    """Save the adapted posterior as its own adapter folder (it loads with the local posterior active)."""
    tuner = abmll_tuner(model)
    if tuner is None:
        raise TypeError("save_adapted needs an ABMLL PeftModel; for other models use save_pretrained.")
    save_pretrained_atomic(cast(PeftModel, model), path)  # an interrupted save keeps the previous folder
    return Path(path)

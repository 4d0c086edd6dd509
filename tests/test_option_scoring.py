"""Option scoring: each option's mean token log-likelihood, checked against a plain per-option forward."""

from __future__ import annotations

import logging

import pytest
import torch
from _tasks import WORDS, task_family, tiny_lm
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import peft_abmll
from peft_abmll import ABMLLConfig, MetaTrainingArguments, TaskEncoder, adaptation
from peft_abmll.data import LetterCollisionError, seeded_torch_rng

EXAMPLES = [
    {"question": "cat is", "choices": ["red", "blue green", "white black red"], "label": 1, "context": ""},
    {"question": "dog is", "choices": ["yes", "no"], "label": 0, "context": "the sun"},
    {"question": "fish is", "choices": ["one two", "three", "four five", "x"], "label": 3, "context": ""},
]


def _model(tok):
    with seeded_torch_rng(0):
        return get_peft_model(tiny_lm(tok), ABMLLConfig(init_weights=False, init_std=0.05))


def _reference(model, enc: TaskEncoder, example: dict, reduce: str = "mean") -> torch.Tensor:
    """One unpadded forward per option with full logits: softmax over mean (or summed) answer-token log-probs."""
    scores = []
    for j in range(len(example["choices"])):
        encoded = enc.encode_option(example, j)
        ids = torch.tensor([encoded["input_ids"]])
        start = encoded["prompt_length"]
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        answer = ids[0, start:]
        scores.append(getattr(log_probs[start - 1 : ids.shape[1] - 1].gather(-1, answer[:, None]), reduce)())
    return torch.softmax(torch.stack(scores), dim=-1)


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("logits_to_keep", [True, False])
def test_option_scoring_matches_a_plain_forward_per_option(tok, logits_to_keep, prefix_cache, monkeypatch) -> None:
    from peft_abmll import adaptation

    if not logits_to_keep:
        monkeypatch.setattr(adaptation, "_takes_logits_to_keep", lambda model: False)
    cached = []
    if prefix_cache:  # the prompt runs once and its cache serves every option: check that path ran
        real = adaptation._logits_after_shared_prefix
        monkeypatch.setattr(adaptation, "_logits_after_shared_prefix", lambda *a: cached.append(real(*a)) or cached[-1])
    else:
        monkeypatch.setattr(adaptation, "_shared_prefix", lambda ids, length: 0)
    model = _model(tok).eval()
    enc = TaskEncoder(tok, answer_format="option")
    probs = peft_abmll.predict_proba(model, EXAMPLES, encoder=enc)
    assert probs.shape == (3, 4)
    for i, example in enumerate(EXAMPLES):
        k = len(example["choices"])
        with torch.no_grad():
            torch.testing.assert_close(probs[i, :k], _reference(model, enc, example), rtol=1e-5, atol=1e-6)
        assert (probs[i, k:] == 0).all()
    assert len(cached) == (len(EXAMPLES) if prefix_cache else 0) and all(c is not None for c in cached)
    letters = peft_abmll.predict_proba(model, EXAMPLES, encoder=enc, scoring="letter")
    assert not torch.allclose(letters, probs)  # a different score of the same model


def test_summed_option_scoring_is_the_models_probability_of_each_text(tok) -> None:
    """``option_sum``: softmax of the summed log-likelihoods, i.e. P(text | prompt) renormalised over the options;
    it differs from the mean where options have different lengths (the third example), not where all are one
    token long (the second)."""
    model = _model(tok).eval()
    enc = TaskEncoder(tok, answer_format="option")
    summed = peft_abmll.predict_proba(model, EXAMPLES, encoder=enc, scoring="option_sum")
    mean = peft_abmll.predict_proba(model, EXAMPLES, encoder=enc)
    for i, example in enumerate(EXAMPLES):
        k = len(example["choices"])
        with torch.no_grad():
            torch.testing.assert_close(summed[i, :k], _reference(model, enc, example, "sum"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(summed[1], mean[1])
    assert not torch.allclose(summed[2], mean[2], atol=1e-3)


def test_option_scoring_averages_posterior_samples(tok) -> None:
    model = _model(tok)
    enc = TaskEncoder(tok, answer_format="option")
    mean = peft_abmll.predict_proba(model, EXAMPLES, encoder=enc)
    many = peft_abmll.predict_proba(model, EXAMPLES, encoder=enc, num_samples=4)
    singles = []
    for s in range(4):
        with model.base_model.posterior_sample(s):
            singles.append(peft_abmll.predict_proba(model, EXAMPLES, encoder=enc, num_samples=1))
    torch.testing.assert_close(many, torch.stack(singles).mean(0))
    assert not torch.allclose(many, mean, atol=1e-5)


def test_a_cut_prompt_is_the_same_for_every_option(tok) -> None:
    """A prompt longer than max_length is cut once, to fit the longest option: same context, shared tokens."""
    long = {"question": " ".join(["cat is red"] * 20), "choices": ["x", "one two three four"], "label": 0}
    enc = TaskEncoder(tok, answer_format="option", max_length=24)
    rows = enc.encode_options(long)
    prompts = [r["input_ids"][: r["prompt_length"]] for r in rows]
    assert prompts[0] == prompts[1] and max(len(r["input_ids"]) for r in rows) == 24
    assert len(rows[0]["input_ids"]) < 24  # the short option's row is not filled up with more context
    assert [r["input_ids"][r["prompt_length"] :] for r in rows] == [
        enc.answer_ids({**long, "label": j}, "option") for j in range(2)
    ]


def test_prefix_cache_keeps_each_posterior_sample(tok, monkeypatch) -> None:
    """A sample drawn for the prompt pass is the one the option pass sees: cached == uncached with S = 3."""
    model = _model(tok)
    enc = TaskEncoder(tok, answer_format="option")
    cached = peft_abmll.predict_proba(model, EXAMPLES, encoder=enc, num_samples=3)
    monkeypatch.setattr(adaptation, "_shared_prefix", lambda ids, length: 0)
    torch.testing.assert_close(cached, peft_abmll.predict_proba(model, EXAMPLES, encoder=enc, num_samples=3))


def test_option_format_trains_on_the_option_text(tok) -> None:
    enc = MetaTrainingArguments(output_dir="/tmp/unused", report_to=[], answer_format="option").task_encoder(tok)
    encoded = enc.encode(EXAMPLES[0])
    answer = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100]
    assert tok.decode(answer).split() == ["blue", "green"]
    assert tok.decode(TaskEncoder(tok, answer_format="letter").answer_ids(EXAMPLES[0])).replace(" ", "") == "B)"
    assert TaskEncoder(tok).answer_ids(EXAMPLES[0]) == enc.answer_ids(EXAMPLES[0])  # the default format
    assert MetaTrainingArguments(output_dir="/tmp/unused", report_to=[]).answer_format == "option"


def test_default_encoder_follows_the_format_the_adapter_was_meta_trained_with(tok) -> None:
    model = _model(tok)
    assert adaptation.encoder_for(tok, None, model).answer_format == "option"  # nothing recorded: the default
    config = model.peft_config["default"]
    config.training_record = {"meta_training": {"answer_format": "letter"}}  # as MetaTrainer records it
    assert adaptation.encoder_for(tok, None, model).answer_format == "letter"
    letter = peft_abmll.predict_proba(model, EXAMPLES, encoder=TaskEncoder(tok, answer_format="letter"))
    torch.testing.assert_close(peft_abmll.predict_proba(model, EXAMPLES, tokenizer=tok), letter)
    explicit = TaskEncoder(tok, answer_format="option")
    assert adaptation.encoder_for(tok, explicit, model) is explicit


def test_colliding_letters_fall_back_to_option_scoring_with_a_message(caplog) -> None:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for token in [*"abcdefghijklmnopqrstuvwxyz0123456789.,:;!?()", *WORDS]:  # no capital letters: A and B are [UNK]
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    letters = TaskEncoder(tok, answer_format="letter")
    with pytest.raises(LetterCollisionError, match="option scoring"):
        letters.label_token_ids(3)
    model = _model(tok)
    with caplog.at_level(logging.WARNING, logger="peft_abmll"):
        probs = peft_abmll.predict_proba(model, EXAMPLES, encoder=letters)
    assert "Scoring by option log-likelihood instead" in caplog.text
    torch.testing.assert_close(probs, peft_abmll.predict_proba(model, EXAMPLES, encoder=letters, scoring="option"))


def test_evaluate_tasks_scores_with_the_encoders_format(tok) -> None:
    family = task_family(num_tasks=2, per_task=14, seed=0)
    model = _model(tok)
    common = dict(lr=1e-2, max_query=4, support_batches=2)
    by_option = peft_abmll.evaluate_tasks(model, family, encoder=TaskEncoder(tok, answer_format="option"), **common)
    letters = TaskEncoder(tok, answer_format="letter")
    explicit = peft_abmll.evaluate_tasks(model, family, encoder=letters, scoring="option", **common)
    by_letter = peft_abmll.evaluate_tasks(model, family, encoder=letters, **common)
    assert by_option["pooled"]["nll"] != pytest.approx(by_letter["pooled"]["nll"], rel=1e-4)
    # the same scores, but trained on the format's own answer: the 2-step adaptations differ
    assert explicit["pooled"]["nll"] != pytest.approx(by_letter["pooled"]["nll"], rel=1e-4)


def test_bad_scoring_is_refused(tok) -> None:
    with pytest.raises(ValueError, match="scoring='words'"):
        peft_abmll.predict_proba(_model(tok), EXAMPLES, tokenizer=tok, scoring="words")
    with pytest.raises(ValueError, match="answer_format"):
        TaskEncoder(tok, answer_format="words")


def test_meta_training_arguments_carry_the_evaluation_scoring(tmp_path) -> None:
    from peft_abmll import MetaTrainingArguments

    args = MetaTrainingArguments(output_dir=str(tmp_path), report_to=[], eval_scoring="option_sum")
    assert args.evaluation_protocol().scoring == "option_sum"
    assert MetaTrainingArguments(output_dir=str(tmp_path), report_to=[]).evaluation_protocol().scoring is None
    with pytest.raises(ValueError, match="eval_scoring='words'"):
        MetaTrainingArguments(output_dir=str(tmp_path), report_to=[], eval_scoring="words")

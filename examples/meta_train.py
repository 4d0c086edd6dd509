"""Meta-train ABMLL on a generated task family with a tiny model, adapt to unseen tasks, print accuracy and ECE.

    python examples/meta_train.py

Runs offline in about a minute on a laptop CPU. Swap the tiny model and the generated tasks for your own
causal LM and a task-format `datasets.Dataset` (columns task, question, choices, label) for real use.
"""

from __future__ import annotations

import random
import tempfile

import torch
from datasets import Dataset
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import peft_abmll
from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments

NOUNS = ["cat", "dog", "fish", "bird", "cow", "sun", "moon", "star"]
COLOURS = ["red", "blue", "green", "black", "white"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline (real use: AutoTokenizer.from_pretrained(...))."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    words = "return the label of correct answer for question below choices is".split() + NOUNS + COLOURS
    for token in [*"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.,:;!?()", *words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def tasks(num_tasks: int, prefix: str, seed: int) -> Dataset:
    """A family of tasks sharing one rule (the last-listed option is correct), each with its own questions."""
    rng = random.Random(seed)
    rows = []
    for t in range(num_tasks):
        for _ in range(30):
            choices = rng.sample(COLOURS, 3)
            rows.append({"task": f"{prefix}{t}", "question": f"{rng.choice(NOUNS)} is", "choices": choices, "label": 2})
    return Dataset.from_list(rows)


def main() -> None:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    model = get_peft_model(LlamaForCausalLM(config), ABMLLConfig(r=4, lora_alpha=8))
    held_out = tasks(3, "new-task-", seed=1)
    with tempfile.TemporaryDirectory() as out:
        args = MetaTrainingArguments(
            output_dir=out,
            max_steps=30,
            outer_step_size=1.0,  # the global step: Reptile's interpolation for the mean, annealed to 0
            inner_learning_rate=1e-2,
            logging_steps=10,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            adaptation_learning_rate=1e-4,
            eval_max_query=20,
        )
        trainer = MetaTrainer(
            model=model,
            args=args,
            train_dataset=tasks(8, "train-task-", seed=0),
            eval_dataset=held_out,
            processing_class=tok,
        )
        trainer.train()
        metrics = trainer.evaluate()
        print(f"held-out accuracy {metrics['eval_accuracy']:.3f}  ECE {metrics['eval_ece']:.3f}")

        # few-shot adaptation to one unseen task, then calibrated probabilities
        examples = peft_abmll.prepare_tasks(held_out)["new-task-0"]
        peft_abmll.adapt(model, examples[:10], tokenizer=tok, steps=5, lr=1e-2)
        probs = peft_abmll.predict_proba(model, examples[10:14], tokenizer=tok)
        print("adapted probabilities (rows: examples, columns: options A-C):")
        print(probs.numpy().round(3))


if __name__ == "__main__":
    main()

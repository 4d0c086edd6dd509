"""ABMLL as a drop-in for LoRA in an existing pipeline: a plain transformers Trainer, no MetaTrainer."""

from __future__ import annotations

import torch
from _tasks import tiny_lm, tiny_tokenizer
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import peft_abmll


def test_plain_trainer_trains_saves_and_reloads_an_abmll_adapter(tmp_path) -> None:
    tok = tiny_tokenizer()
    texts = ["the cat is red", "the dog is blue", "a bird is green"] * 8
    data = Dataset.from_dict({"text": texts}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    model = get_peft_model(tiny_lm(tok), peft_abmll.ABMLLConfig(task_type="CAUSAL_LM"))
    before = [p.detach().clone() for p in model.base_model.global_parameters()]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False)
    )
    trainer.train()
    # by default the global posterior is the active, trainable one: every factor moves, like LoRA's
    assert all(not torch.equal(a, b) for a, b in zip(before, model.base_model.global_parameters()))
    trainer.save_model(str(tmp_path / "final"))
    reloaded = PeftModel.from_pretrained(tiny_lm(tok), str(tmp_path / "final")).eval()
    model.eval()
    x = torch.tensor([tok("the cat is")["input_ids"]])
    torch.testing.assert_close(reloaded(x).logits, model(x).logits)

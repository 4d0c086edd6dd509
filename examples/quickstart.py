"""ABMLL quickstart: a Bayesian LoRA on a tiny Llama, one training step, save, reload.

Runs offline in seconds (the model is built from a config, no download):

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_abmll  # registers the ABMLL adapter type with PEFT: import it before get_peft_model / from_pretrained

VOCAB = 64


def tiny_llama() -> LlamaForCausalLM:
    """A tiny random Llama; the same weights on every call (seeded)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def train_step(model: PeftModel, input_ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """One step on the Bayesian objective: the model's training loss is NLL + loss_beta * -log p(global) per entry."""
    model.train()  # training forward passes sample a weight update from the posterior
    loss = model(input_ids=input_ids, labels=input_ids).loss  # the variational term is already in it
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    terms = model.base_model.pop_loss_logs()  # abmll_nll, abmll_neg_log_prior of this step
    print(f"loss={loss.item():.4f}  " + "  ".join(f"{k}={v:.4f}" for k, v in terms.items()))


@torch.no_grad()
def eval_logits(model: PeftModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Eval mode uses the posterior mean: deterministic, equal to the merged model."""
    return model.eval()(input_ids=input_ids).logits


def main() -> None:
    model = get_peft_model(tiny_llama(), peft_abmll.ABMLLConfig(r=8, lora_alpha=16))
    model.print_trainable_parameters()
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_step(model, input_ids, torch.optim.AdamW(trainable, lr=1e-2))
    logits = eval_logits(model, input_ids)
    with model.disable_adapter():
        change = (logits - eval_logits(model, input_ids)).abs().max().item()
    print(f"largest logit change from the base model after one step: {change:.3e}")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(tiny_llama(), folder)
        reloaded_logits = eval_logits(reloaded, input_ids)

    match = torch.equal(logits, reloaded_logits)
    print(f"eval logits match after save/reload: {match}")
    if not match:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

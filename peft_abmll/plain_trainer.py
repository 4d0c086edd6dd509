"""An ABMLL adapter in a plain `transformers.Trainer`, TRL's `SFTTrainer` or any loop: logging and a loss function.

```python
trainer = Trainer(model=get_peft_model(base, ABMLLConfig()), ..., callbacks=[VariationalLossCallback()])
# trainers that compute the loss from the logits themselves (TRL's SFTTrainer) take it as compute_loss_func:
trl.SFTTrainer(..., peft_config=ABMLLConfig(), compute_loss_func=variational_loss)
```
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import TrainerCallback
from transformers.loss.loss_utils import ForCausalLMLoss

from .algorithms import abmll_tuner


class VariationalLossCallback(TrainerCallback):
    """Logs the terms of the ABMLL training loss next to the Trainer's ``loss``.

    The model adds its variational terms to the loss it returns in training mode (`ABMLLConfig.loss_beta`);
    this callback adds their means since the last log as ``abmll_nll`` and ``abmll_kl`` / ``abmll_neg_log_prior``
    to the log record (``trainer.state.log_history`` and the callbacks after this one).
    """

    def on_log(
        self, args: Any, state: Any, control: Any, model: Any = None, logs: Optional[dict] = None, **kwargs: Any
    ) -> None:
        tuner = abmll_tuner(model) if model is not None else None
        if tuner is None or logs is None:
            return
        terms = tuner.pop_loss_logs()
        logs.update(terms)
        if state.log_history:
            state.log_history[-1].update(terms)


def variational_loss(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: Optional[torch.Tensor] = None, **kwargs: Any
) -> torch.Tensor:
    """Causal-LM NLL of `outputs` plus the variational terms the ABMLL model attached to them.

    For trainers whose loss is computed from the logits rather than taken from ``outputs.loss`` (a
    ``compute_loss_func`` of `transformers.Trainer` or TRL's `SFTTrainer`): in training mode an ABMLL model called
    without labels returns ``outputs.abmll_regularizer`` (``loss_beta * regularizer``), which this adds to the
    token-averaged NLL (transformers' `ForCausalLMLoss`). Outputs without it (eval mode, other adapters) give the NLL.
    """
    logits = outputs["logits"]
    loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)
    regularizer = outputs.get("abmll_regularizer") if hasattr(outputs, "get") else None
    return loss if regularizer is None else loss + regularizer.to(loss.device, loss.dtype)

"""Trainer callbacks for ABMLL adapters trained by any `transformers.Trainer` (or TRL's `SFTTrainer`).

```python
trainer = Trainer(model=get_peft_model(base, ABMLLConfig()), ..., callbacks=[VariationalLossCallback()])
```
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback

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

"""lm-evaluation-harness with ABMLL adapters: a registered model type and a one-line command.

```bash
abmll-lm-eval --model abmll --model_args pretrained=<base>,peft=<abmll adapter>,num_samples=8 --tasks <tasks>
```

``abmll-lm-eval`` (or ``python -m peft_abmll.integrations.lm_eval_harness``) is the harness's own command line
(`lm_eval.__main__.cli_evaluate`, every option of ``lm_eval``) with this module imported first, which registers
ABMLL with PEFT and the model type ``abmll`` with the harness. ``abmll`` is the harness's ``hf`` model plus one
argument, ``num_samples``: the log-likelihoods of a request are those of the predictive distribution averaged
over that many seeded posterior samples (``log mean_s p_s``); 1 (default) uses the posterior mean, like
``--model hf``. From Python: ``lm_eval.simple_evaluate(model="abmll", ...)`` after ``import`` of this module.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import peft_abmll  # noqa: F401  (registers the ABMLL PEFT type before the harness loads the adapter)

from ..algorithms import abmll_tuner

__all__ = ["ABMLLHarnessModel", "main"]


@register_model("abmll")
class ABMLLHarnessModel(HFLM):
    """The harness's Hugging Face model with an ABMLL adapter (``peft=...``) and posterior-averaged log-likelihoods."""

    def __init__(self, *args: Any, num_samples: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_samples = int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if self.num_samples > 1 and abmll_tuner(self.model) is None:
            raise ValueError("num_samples > 1 needs an ABMLL adapter: pass peft=<an ABMLL adapter folder or Hub id>.")

    def _model_call(
        self, inps: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits whose log-softmax is ``log mean_s softmax(logits_s)`` over `num_samples` posterior samples."""
        if self.num_samples == 1:
            return super()._model_call(inps, attn_mask, labels)
        tuner = abmll_tuner(self.model)
        assert tuner is not None  # checked in __init__
        total: Optional[torch.Tensor] = None
        for s in range(self.num_samples):
            with tuner.posterior_sample(s, keep=False):  # one forward per sample: nothing to reuse, so hold nothing
                log_probs = torch.log_softmax(super()._model_call(inps, attn_mask, labels).float(), dim=-1)
            total = log_probs if total is None else torch.logaddexp(total, log_probs)
        assert total is not None
        return total - math.log(self.num_samples)


def main() -> None:
    """``lm_eval``'s command line with the ``abmll`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

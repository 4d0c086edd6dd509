"""The generated task families of the tests live in the package (`peft_abmll.synthetic`); re-exported here."""

from peft_abmll.synthetic import WORDS, best_probabilities, task_family, tiny_lm, tiny_tokenizer

__all__ = ["WORDS", "best_probabilities", "task_family", "tiny_lm", "tiny_tokenizer"]

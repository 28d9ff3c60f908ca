"""Train on the team's own data: a JSONL file of prompt/response pairs, read as text.

`dataset=` takes a file path (.jsonl / .json / .txt / .parquet) or a Hugging Face Dataset. The text is
tokenized with the model's own tokenizer; the built-in tiny Llama has none and a vocabulary of 256, so it
reads UTF-8 bytes. Whole pairs are packed into `seq_len` rows, and the loss is taken on the response
tokens only: the adapter is judged on what it answers, not on the prompts it was given.
"""

from pathlib import Path

import pytest
from peft import LoraConfig

from pytest_lora import assert_no_plateau

pytestmark = pytest.mark.lora

PAIRS = Path(__file__).parent / "data" / "unit_conversions.jsonl"  # {"prompt": ..., "response": ...} per line


def test_learns_the_teams_own_pairs(lora_train):
    """The policy's sound config learns the team's data: the response loss falls clearly within 40 steps."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    result = lora_train(config, dataset=PAIRS, steps=40)
    assert_no_plateau(result)

"""pytest-lora: write your LoRA rank policy as tests."""

"""The pure core: settings, policy, curves, shapes and the FLOP / memory arithmetic on them, the sweep rule,
the report formats. Standard library only (no torch, PEFT, transformers, bitsandbytes or pytest), tested
directly."""

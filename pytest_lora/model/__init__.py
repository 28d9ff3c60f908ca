"""The model side: loading, adapters, counting, training, measuring, the assertions. torch, transformers,
PEFT and bitsandbytes are imported inside the functions; pytest never."""

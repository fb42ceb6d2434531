"""Training that produces checkpoints to merge: LoRA SFT and DPO, written as PEFT adapters.

Importing this package is cheap; torch, transformers, PEFT and TRL are imported inside the
functions that need them, so the service starts without them.
"""

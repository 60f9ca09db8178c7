"""LoRA initializations: PEFT default, Nystrom, PiSSA, LoRA-GA, ETF."""

"""QLoRA fine-tuning of Llama 3.2 1B-Instruct on SAMSum. Nothing heavy is imported here, so
`samsum-qlora --help` and test collection stay fast."""

__version__ = "0.1.0"

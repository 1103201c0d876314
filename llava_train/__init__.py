"""llava-train: train and fine-tune LLaVA-style vision-language models."""

__version__ = "0.1.0"

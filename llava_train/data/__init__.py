"""Data package: tokenizers, conversation templates, images, datasets, collator and samplers.

The public API the trainer calls lives here; see docs/INTERFACES.md for the batch contract.
Importing this package is cheap: transformers is imported lazily inside the functions that need it.
"""

from llava_train.data.collator import DataCollator
from llava_train.data.config import DataConfig, VisionSpec
from llava_train.data.conversation import TEMPLATES, Template, get_template, render_prompt
from llava_train.data.dataset import LazySupervisedDataset, build_dataset
from llava_train.data.errors import BadRecordError
from llava_train.data.image import build_image_processor, load_image, process_images
from llava_train.data.preprocess import tokenize_conversation, tokenizer_image_token
from llava_train.data.sampler import LengthGroupedSampler, ModalityLengthGroupedSampler, build_sampler
from llava_train.data.tokenizers import load_tokenizer

__all__ = [
    "TEMPLATES",
    "BadRecordError",
    "DataCollator",
    "DataConfig",
    "LazySupervisedDataset",
    "LengthGroupedSampler",
    "ModalityLengthGroupedSampler",
    "Template",
    "VisionSpec",
    "build_dataset",
    "build_image_processor",
    "build_sampler",
    "get_template",
    "load_image",
    "load_tokenizer",
    "process_images",
    "render_prompt",
    "tokenize_conversation",
    "tokenizer_image_token",
]

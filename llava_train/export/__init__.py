"""Export: LoRA merge, transformers-native conversion (both ways), original release files."""

from llava_train.export.hf_import import import_hf
from llava_train.export.hf_native import export_hf, native_kind, to_native_model
from llava_train.export.lora import merge_lora, merge_pretrain
from llava_train.export.original import load_original, load_projector

__all__ = [
    "export_hf",
    "import_hf",
    "load_original",
    "load_projector",
    "merge_lora",
    "merge_pretrain",
    "native_kind",
    "to_native_model",
]

"""Constants shared by the data side and the model side, defined once."""

# Label value ignored by the cross-entropy loss (PyTorch's default ignore_index).
IGNORE_INDEX = -100
# Placeholder id written into input_ids where an image's features are inserted.
IMAGE_TOKEN_INDEX = -200

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"

# Weight files a stage writes (original key names), read back by resume and by export.
PROJECTOR_FILE = "mm_projector.safetensors"  # pretrain: projector (+ image_newline)
VISION_TOWER_FILE = "vision_tower.safetensors"  # pretrain, when the tower trains
NON_LORA_FILE = "non_lora_trainables.safetensors"  # finetune_lora: everything trainable but LoRA

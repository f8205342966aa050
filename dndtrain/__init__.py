"""dndtrain: D&D scenario markdown -> LoRA fine-tuned Dungeon Master model -> GGUF in your app's assets."""

__version__ = "0.1.0"

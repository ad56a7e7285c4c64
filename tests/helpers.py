"""Small helpers shared by the tests."""


def enable_checkpointing(model):
    """transformers 5.2x renames gradient_checkpointing_enable; support both (the GPU image has 5.17)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()

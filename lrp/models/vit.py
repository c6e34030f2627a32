"""A small Vision Transformer for the project's synthetic 64 px images, trainable on a CPU.

torchvision's own ``VisionTransformer`` (so the engine explains the class users actually have,
with its fused ``nn.MultiheadAttention`` call), sized down: 8 px patches give 8 x 8 = 64 tokens
plus the class token, 4 pre-LayerNorm encoder blocks of width 128 with 4 heads of 32 and an MLP
of 256 (0.56 M parameters, ~36 M MACs per image). The position embeddings are fixed to the
64 px grid: other input sizes are refused by torchvision's forward.

torchvision initialises the classification head to zero (as in the ViT paper's fine-tuning
recipe); training from scratch starts from the uniform prediction, which is harmless.
"""

from __future__ import annotations

from typing import Any

from torchvision.models import VisionTransformer


def small_vit(
    num_classes: int = 10,
    image_size: int = 64,
    patch_size: int = 8,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 128,
    mlp_dim: int = 256,
    **kwargs: Any,
) -> VisionTransformer:
    """torchvision ``VisionTransformer`` for 64 px inputs (see the module docstring).

    ``kwargs`` go to ``VisionTransformer`` (e.g. ``dropout``, ``attention_dropout``); the
    explainer needs eval mode either way.
    """
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
        **kwargs,
    )

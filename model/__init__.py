"""The model both data-plane images build: a timm backbone, optionally adapted with peft LoRA.

The trainer fine-tunes it and the aggregator rebuilds it to merge the final model, so it lives
apart from both (importable as fedtrain.model); the operator's image holds neither it nor torch.
"""

from .errors import ModelError
from .exchange import ExchangeError, ExchangePlan, resolve_exchange, timm_name
from .factory import (
    FederatedModel,
    ModelRecipe,
    auto_lora_rank,
    build_model,
    create_backbone,
    load_plain_model,
    merged_model_config,
    resolve_rank,
)

__all__ = [
    "ExchangeError",
    "ExchangePlan",
    "FederatedModel",
    "ModelError",
    "ModelRecipe",
    "auto_lora_rank",
    "build_model",
    "create_backbone",
    "load_plain_model",
    "merged_model_config",
    "resolve_exchange",
    "resolve_rank",
    "timm_name",
]

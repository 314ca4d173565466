"""Where a run trains and what it adapts: the device, the autocast dtype, and the layers
(linear projections) and expert weights LoRA is applied to, found in the model itself."""

from __future__ import annotations

import torch
from torch import nn


def resolve_device(device: str = "auto") -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("INGS_TRAIN_DEVICE=cuda but no CUDA device is available")
        return torch.device("cuda")
    if device not in ("auto", "cpu"):
        raise ValueError(f"unknown training device {device!r}")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def target_modules_for(model: nn.Module) -> list[str]:
    """Suffixes of every linear projection in the model except the output head."""
    from transformers.pytorch_utils import Conv1D

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not head and name
    }
    if head is not None:
        # The head's own suffix (lm_head) must not match some other layer by name either.
        names -= {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head}
    if not names:
        raise ValueError("the base model has no linear layers LoRA could adapt")
    return sorted(names)


def target_parameters_for(model: nn.Module) -> list[str]:
    """Suffixes (`experts.gate_up_proj`) of the 3-D expert weights that mixture-of-experts
    models keep as one tensor per layer in transformers 5 (Mixtral, Qwen-MoE, GPT-OSS):
    not `nn.Linear`, so adapted through peft's `target_parameters`. Routers are left alone."""
    return sorted(
        {
            f"{name.rsplit('.', 1)[-1]}.{param_name}"
            for name, module in model.named_modules()
            for param_name, param in module.named_parameters(recurse=False)
            if param.ndim == 3 and name
        }
    )


def has_conv1d(model: nn.Module) -> bool:
    """True when the model's projections are transformers' Conv1D (GPT-2), whose weights
    are stored transposed: peft must be told (`fan_in_fan_out`)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for module in model.modules())

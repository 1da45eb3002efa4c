"""Zamba2PreTrainedModel: what every Zamba2 model class shares (initialisation, dtype/device, gradient
checkpointing, and the documented from_pretrained / save_pretrained / quantize entry points, whose work is in
zamba2/checkpoint/ and zamba2/quant/)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from zamba2.config import Zamba2Config
from zamba2.layers.mamba2 import Mamba2Mixer
from zamba2.ops.norms import GatedRMSNorm, RMSNorm


class Zamba2PreTrainedModel(nn.Module):
    config: Zamba2Config

    def _post_init(self) -> None:
        self.apply(self._init_module)
        self.tie_weights()

    @torch.no_grad()
    def _init_module(self, module: nn.Module) -> None:
        """Weight init as documented: linear/embedding N(0, initializer_range), norms 1, SSM parameters per
        Mamba2. Cheap no-ops on the meta device."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None and module.weight.device.type != "meta":
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            module.weight.fill_(1.0)
        elif isinstance(module, Mamba2Mixer) and module.A_log.device.type != "meta":
            module.init_ssm_parameters(self.config)

    def tie_weights(self) -> None:
        """Point lm_head at the embedding when the config ties them (also after loading with assign=True)."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def gradient_checkpointing_enable(self) -> None:
        self._backbone().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._backbone().gradient_checkpointing = False

    def _backbone(self) -> nn.Module:
        """The Zamba2Model: `self.model` of a head class (Zamba2Model overrides this with itself)."""
        return self.model

    # Loading and saving live in zamba2/checkpoint/; these are the documented entry points.
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        device_map: str | int | torch.device | dict[str, Any] | None = None,
        torch_dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        quantize: str | None = None,
        quantize_group_size: int = 64,
        progress: bool = True,
        config: Zamba2Config | None = None,
        num_labels: int | None = None,
        problem_type: str | None = None,
        id2label: dict[int, str] | None = None,
        label2id: dict[str, int] | None = None,
        adapter: str | os.PathLike | None = None,
        **unsupported: Any,
    ):
        """Load a published (or fine-tuned, or legacy-format) checkpoint from a folder or a hub id.

        Built on the meta device and filled from memory-mapped safetensors, converting each tensor to `dtype`
        ("auto" = the checkpoint's stored dtype; `torch_dtype` is its older name) on `device` (default CPU) or
        transformers' `device_map` ("auto" = CUDA when present, else CPU; one device only).
        `quantize="int8" | "int4"` quantises the large linears after loading. Classification overrides
        (num_labels, problem_type, id2label, label2id) as in transformers. `adapter` is a PEFT LoRA folder
        (adapter_config.json + adapter_model.safetensors) applied on top, frozen (zamba2/train/lora.py:
        attach_adapter). Other transformers arguments are accepted where they change nothing here, else refused
        naming what to use instead (zamba2/compat.py)."""
        from zamba2 import checkpoint as ckpt
        from zamba2 import compat

        compat.reject(f"{cls.__name__}.from_pretrained", unsupported, compat.FROM_PRETRAINED)

        overrides = {
            k: v
            for k, v in dict(
                num_labels=num_labels, problem_type=problem_type, id2label=id2label, label2id=label2id
            ).items()
            if v is not None
        }
        model = ckpt.load_pretrained(
            cls, path_or_id, dtype=dtype, device=device, device_map=device_map, torch_dtype=torch_dtype,
            revision=revision, cache_dir=cache_dir, token=token,
            quantize=quantize if adapter is None else None, quantize_group_size=quantize_group_size,
            progress=progress, config=config, config_overrides=overrides,
        )  # fmt: skip
        if adapter is not None:  # on the float weights; quantised after merging, if asked
            from zamba2.train.lora import attach_adapter

            attach_adapter(model, adapter, quantize, quantize_group_size, progress)
        return model

    def quantize(self, mode: str, group_size: int = 64, progress: bool = False) -> dict[str, Any]:
        """Weight-only quantisation in place: every large linear (mamba in/out_proj, attention q/k/v/o, MLP
        gate_up/down, the hybrid `linear`, lm_head as its own copy when tied) becomes int8 per output channel
        or int4 in groups of `group_size`. Adapters, norms, conv, SSM parameters and the embedding stay in the
        model dtype. Recorded in config so save_pretrained writes a loadable quantised checkpoint."""
        from tqdm.auto import tqdm

        from zamba2 import quant

        bar = tqdm(desc=f"Quantising to {mode}", unit="layer", disable=not progress)

        def report(name: str, done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            stats = quant.quantize_model(self, mode, group_size, progress=report)
        finally:
            bar.close()
        self.config.extras["quantization_config"] = quant.quantization_config(
            mode, stats["group_size"] or group_size, stats["modules"]
        )
        return stats

    def save_pretrained(self, folder: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        from zamba2 import checkpoint as ckpt

        ckpt.save_pretrained(self, folder, max_shard_size=max_shard_size)

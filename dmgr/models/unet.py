"""A UNet with the parameter names, shapes and forward function of guided-diffusion's `UNetModel`.

Published DMGR / guided-diffusion state dicts load into it with `strict=True`.
Only 2-D images are supported; gradient checkpointing and the fp16 weight conversion of
guided-diffusion are replaced by torch autocast (`dmgr.models.precision`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHANNEL_MULT = {512: "0.5,1,1,2,2,4,4", 256: "1,1,2,2,4,4", 128: "1,1,2,3,4", 64: "1,2,3,4"}


def _parse_numbers(value: str | Sequence[float | int], cast=float) -> tuple:
    if isinstance(value, str):
        return tuple(cast(part) for part in value.replace(" ", "").split(",") if part)
    return tuple(cast(part) for part in value)


# guided-diffusion create_model arguments that change memory and speed only (the job's precision setting
# replaces use_fp16): accepted and ignored
IGNORED_KEYS = frozenset({"use_checkpoint", "use_fp16"})
RENAMED_KEYS = {"class_cond": "num_classes (the number of classes; null for an unconditional model)"}


class UNetConfigError(ValueError):
    """A UNet config with a key this UNet does not know."""


@dataclass
class UNetConfig:
    """The hyperparameters of guided-diffusion's `create_model`, with its names and defaults."""

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: str = ""
    attention_resolutions: str = "16,8"
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = 0.0
    learn_sigma: bool = False
    num_classes: int | None = None
    in_channels: int = 3  # 4 for a local model that generates RGB + defect mask
    null_class: bool = False  # one more label row, id num_classes: "no class" (label dropout, guidance)

    def to_dict(self) -> dict:
        data = asdict(self)
        if not isinstance(data["channel_mult"], str):
            data["channel_mult"] = ",".join(str(m) for m in data["channel_mult"])
        if not isinstance(data["attention_resolutions"], str):
            data["attention_resolutions"] = ",".join(str(r) for r in data["attention_resolutions"])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        """The config of a dict of create_model names; an unknown key is refused (a typo would build another
        network that may still load the weights strictly)."""
        fields = cls.__dataclass_fields__
        for key in data:
            if key not in fields and key not in IGNORED_KEYS:
                raise UNetConfigError(f"UNet config key {key!r} is unknown: {_hint(key, list(fields))}")
        return cls(**{k: v for k, v in data.items() if k in fields})


def _hint(key: str, known: list[str]) -> str:
    if key in RENAMED_KEYS:
        return f"use {RENAMED_KEYS[key]}"
    close = difflib.get_close_matches(str(key), known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"


def attention_levels(config: UNetConfig) -> tuple[int, ...]:
    """The feature-map sides (px) of the network's levels: image_size / 2^k for each entry of channel_mult."""
    mult = config.channel_mult or DEFAULT_CHANNEL_MULT.get(config.image_size, "")
    return tuple(config.image_size // 2**k for k in range(len(_parse_numbers(mult, float))))


def check_attention(config: UNetConfig) -> None:
    """Refuse attention_resolutions that no level of the network has (a resolution r puts attention where the
    feature map is r px: image_size / r must be one of the network's downsampling factors 1, 2, 4, ...); such
    a network silently has no attention there, e.g. a 64 px architecture's "16" at image_size 128."""
    levels = attention_levels(config)
    factors = {2**k for k in range(len(levels))}
    asked = _parse_numbers(config.attention_resolutions, int)
    unreachable = [r for r in asked if r <= 0 or config.image_size // r not in factors]
    if unreachable:
        raise UNetConfigError(
            f"attention_resolutions={config.attention_resolutions} at image_size={config.image_size}: no level of "
            f"this network is {', '.join(map(str, unreachable))} px, so it would have no attention there; its levels "
            f"are {', '.join(map(str, levels))} px: set attention_resolutions to some of them (a preset sized for "
            "this image_size: conf/arch/)"
        )


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding: cosines first, then sines (guided-diffusion's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


ATTENTION_KERNELS = ("auto", "classic", "sdpa")


def _attention_legacy(qkv: torch.Tensor, heads: int, kernel: str) -> torch.Tensor:
    """Heads split before q/k/v (guided-diffusion's default ordering)."""
    batch, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(batch * heads, ch * 3, length).split(ch, dim=1)
    return _attend(q, k, v, kernel).reshape(batch, -1, length)


def _attention_new_order(qkv: torch.Tensor, heads: int, kernel: str) -> torch.Tensor:
    """q/k/v split before heads (`use_new_attention_order`)."""
    batch, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.chunk(3, dim=1)
    shape = (batch * heads, ch, length)
    return _attend(q.reshape(shape), k.reshape(shape), v.reshape(shape), kernel).reshape(batch, -1, length)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) over (B, ch, T) tensors. `auto` takes the fused kernel on CUDA only,
    so CPU results stay bit-identical to the classic form (the reference-parity fixtures)."""
    if kernel == "sdpa" or (kernel == "auto" and q.is_cuda):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, num_head_channels: int, use_new_attention_order: bool):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} is not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.attend = _attention_new_order if use_new_attention_order else _attention_legacy
        self.kernel = "auto"  # set for the whole model by set_attention_kernel
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = self.proj_out(self.attend(self.qkv(self.norm(x)), self.num_heads, self.kernel))
        return (x + h).reshape(batch, channels, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """Passes the timestep embedding to the ResBlocks among its children."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """guided-diffusion's UNet; keyword names as in its `create_model`.

    `model(x, t, y=None)` returns (B, 2C, H, W) with learned sigma (epsilon first), else (B, C, H, W), for
    C = in_channels (3; 4 for a local model that also generates the defect mask).
    `null_class` (not a guided-diffusion argument) gives a class-conditional model one more label, id
    `num_classes`, meaning "no class": the unconditional prediction of a model trained with label dropout.
    Off, the parameters are exactly guided-diffusion's.
    """

    def __init__(
        self,
        *,
        image_size: int,
        num_channels: int,
        num_res_blocks: int,
        channel_mult: str | Sequence[float] = "",
        attention_resolutions: str | Sequence[int] = "16,8",
        num_heads: int = 4,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        dropout: float = 0.0,
        learn_sigma: bool = False,
        num_classes: int | None = None,
        in_channels: int = 3,
        null_class: bool = False,
    ):
        super().__init__()
        if null_class and num_classes is None:
            raise UNetConfigError("null_class needs a class-conditional model: set num_classes")
        if channel_mult in ("", None, ()):
            if image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(f"no default channel_mult for image_size {image_size}; set channel_mult")
            channel_mult = DEFAULT_CHANNEL_MULT[image_size]
        mults = _parse_numbers(channel_mult, float)
        attention_ds = {image_size // r for r in _parse_numbers(attention_resolutions, int)}
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.config = UNetConfig(
            image_size=image_size,
            num_channels=num_channels,
            num_res_blocks=num_res_blocks,
            channel_mult=",".join(f"{m:g}" for m in mults),
            attention_resolutions=",".join(str(r) for r in _parse_numbers(attention_resolutions, int)),
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
            dropout=dropout,
            learn_sigma=learn_sigma,
            num_classes=num_classes,
            in_channels=in_channels,
            null_class=null_class,
        )
        self.num_channels = num_channels
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        emb_dim = num_channels * 4

        def res(ch_in: int, ch_out: int, **updown) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, **updown)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(num_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + int(null_class), emb_dim)

        ch = first_ch = int(mults[0] * num_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * num_channels))]
                ch = int(mult * num_channels)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(mults) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, True, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), int(num_channels * mult))]
                ch = int(num_channels * mult)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, True, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(first_ch, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.num_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def null_label(model: nn.Module) -> int | None:
    """The "no class" label id of a model built with null_class, else None."""
    config = getattr(model, "config", None)
    return model.num_classes if getattr(config, "null_class", False) else None


def set_attention_kernel(model: nn.Module, kernel: str) -> None:
    """`classic` (einsum + float32 softmax, as guided-diffusion), `sdpa` (torch's fused
    scaled_dot_product_attention) or `auto` (sdpa on CUDA tensors, classic elsewhere)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: allowed {', '.join(ATTENTION_KERNELS)}")
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.kernel = kernel


def build_unet(config: UNetConfig | dict) -> UNetModel:
    """Build a UNet from a config object or a plain dict of `create_model` names."""
    if isinstance(config, dict):
        config = UNetConfig.from_dict(config)
    data = config.to_dict()
    return UNetModel(**data)

"""PVT v2: Improved Baselines with Pyramid Vision Transformer (Wang et al., 2022).

Differences from PVT v1 (:mod:`.pvt`): overlapping patch embeddings (a 7x7
stride-4 conv, then 3x3 stride-2 convs, each padded by half the kernel, then
LayerNorm), no position embedding (a 3x3 depthwise conv in every MLP gives
the position information instead), and a LayerNorm closing each stage. The
"li" variants use linear spatial-reduction attention (average pooling to 7x7).

Any input size: the padded convolutions already give stage ``i`` exactly
``ceil(H / stride_i)`` x ``ceil(W / stride_i)`` tokens and nothing depends on
the grid, so no resizing is needed. Module names follow timm's ``pvt_v2``,
whose checkpoints load after dropping the classifier head.
"""
import re
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .base import PyramidBackbone, checkpoint_block, drop_path_rates
from .export_ops import map_to_tokens, tokens_to_map
from .layers import init_weights
from .pvt import PVT_REPO_1X_CONFIGS, PVTBlock
from .key_mapping import (
    FamilyMapping,
    dropping,
    pyramid_hparams,
    pyramid_hparams_of_kwargs,
    regex_renamer,
    register_mapping,
    shape_at,
)
from .manifest import FamilyManifest, Variant, Weights, register_family

__all__ = ["OverlapPatchEmbed", "PyramidVisionTransformerV2"]


class OverlapPatchEmbed(nn.Module):
    """Strided conv with ``kernel // 2`` padding, then LayerNorm; returns a ``(B, C, H, W)`` map."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x).permute(0, 3, 1, 2)


class PVTv2Stage(nn.Module):
    """Optional downsampling patch embedding, blocks and the closing LayerNorm of one stage."""

    def __init__(self, in_dim: int, dim: int, downsample: bool, blocks: List[nn.Module]):
        super().__init__()
        self.downsample = OverlapPatchEmbed(in_dim, dim, 3, 2) if downsample else None
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        hw = (x.shape[-2], x.shape[-1])
        x = map_to_tokens(x)
        for blk in self.blocks:
            x = checkpoint_block(blk, x, hw)
        return tokens_to_map(self.norm(x), hw)


class PyramidVisionTransformerV2(PyramidBackbone):
    """PVT v2 as a detectron2 backbone producing ``res2``-``res5``.

    Args:
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: the four stages, as
            in :class:`~.pvt.PyramidVisionTransformer`.
        linear: linear spatial-reduction attention ("li" variants).
        in_chans: image channels.
        drop_path_rate: stochastic depth of the last block.
        out_features: levels to return.
        output_norm: extra LayerNorm on each returned level (each stage
            already ends with one).
        freeze_at: see :class:`~.base.PyramidBackbone`.
    """

    def __init__(self, embed_dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), linear: bool = False, in_chans: int = 3,
                 drop_path_rate: float = 0.1, out_features: Optional[Sequence[str]] = None,
                 output_norm: bool = False, freeze_at: int = 0):
        super().__init__()
        dpr = drop_path_rates(drop_path_rate, depths)
        self.patch_embed = OverlapPatchEmbed(in_chans, embed_dims[0], 7, 4)
        stages, prev = [], embed_dims[0]
        for i in range(4):
            blocks = [PVTBlock(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], drop_path=dpr[i][j],
                               linear=linear, dwconv=True) for j in range(depths[i])]
            stages.append(PVTv2Stage(prev, embed_dims[i], downsample=i > 0, blocks=blocks))
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.apply(init_weights)
        self._init_pyramid(embed_dims, out_features=out_features, output_norm=output_norm, freeze_at=freeze_at)

    def frozen_modules(self, freeze_at: int) -> List[nn.Module]:
        modules: List[nn.Module] = [self.patch_embed]
        modules += list(self.stages[:max(min(freeze_at - 1, 4), 0)])
        return modules

    def forward_features(self, x: torch.Tensor, needed: Sequence[str]) -> Dict[str, torch.Tensor]:
        return self.run_stages(self.patch_embed(x), self.stages, needed)


# ---------------------------------------------------------------------------
# Checkpoints: whai362/PVT pvt_v2.py, and timm's pvt_v2 (= ours)
# ---------------------------------------------------------------------------
def _official_embed_key(m: re.Match) -> str:
    n = int(m[1])
    return f"patch_embed.{m[2]}" if n == 1 else f"stages.{n - 1}.downsample.{m[2]}"


#: whai362/PVT ``pvt_v2.py`` names to timm's (= ours); drops head.
convert_official = regex_renamer([
    (r"patch_embed(\d)\.(.+)", _official_embed_key),
    (r"block(\d)\.(\d+)\.(.+)",
     lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3].replace('mlp.dwconv.dwconv.', 'mlp.dwconv.')}"),
    (r"norm(\d)\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.norm.{m[2]}"),
], drop=("head.",))


def hparams_of_state_dict(state_dict):
    """Depths, widths, MLP ratios and the linear-SRA flag read from a pvt_d2 PVT v2 state dict."""
    hp = pyramid_hparams(state_dict, r"stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight",
                         "stages.{i}.norm.weight", "stages.{i}.blocks.0.mlp.fc1.weight")
    # linear SRA reduces with a 1x1 conv (after pooling), the regular one with an sr x sr conv
    return {**hp, "linear": shape_at(state_dict, "stages.0.blocks.0.attn.sr.weight", axis=3) == 1}


def hparams_of_kwargs(kw):
    return {**pyramid_hparams_of_kwargs(kw), "linear": bool(kw.get("linear", False))}


CHECKPOINT_MAPPING = register_mapping(FamilyMapping(
    "pvt_v2", "PVT v2",
    markers={"official": (r"^patch_embed1\.proj\.weight$", r"^block1\.0\.mlp\.dwconv\.dwconv\.weight$"),
             "timm": (r"^patch_embed\.proj\.weight$", r"^stages\.0\.blocks\.0\.mlp\.dwconv\.weight$")},
    converters={"official": convert_official, "timm": dropping("head.")},
    hparams=hparams_of_state_dict, hparams_of_kwargs=hparams_of_kwargs))


# ---------------------------------------------------------------------------
# Variants: architecture, ImageNet weights (whai362/PVT release v2), detection and published numbers
# ---------------------------------------------------------------------------
_CONFIGS = "whai362/PVT detection/configs/"
_WEIGHTS = Weights("https://github.com/whai362/PVT/releases/download/v2/{arch}.pth", "{arch}.pth")
_B = dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4))
_SMALL_BATCH = ("retinanet_1x", "mask_rcnn_1x")

MANIFEST = register_family(FamilyManifest(
    PyramidVisionTransformerV2, CHECKPOINT_MAPPING,
    variants=(
        Variant("pvt_v2_b0", dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4)),
                _WEIGHTS, short="pvt_v2_b0", drop_path=0.1,
                published_ap={"retinanet_1x": "37.2", "mask_rcnn_1x": "38.2 / 36.2"},
                published_params={"retinanet_1x": 13.0, "mask_rcnn_1x": 23.5}),
        Variant("pvt_v2_b1", dict(_B, depths=(2, 2, 2, 2)), _WEIGHTS, short="pvt_v2_b1", drop_path=0.1,
                published_ap={"retinanet_1x": "41.2", "mask_rcnn_1x": "41.8 / 38.8"},
                published_params={"retinanet_1x": 23.8, "mask_rcnn_1x": 33.7}),
        Variant("pvt_v2_b2", dict(_B, depths=(3, 4, 6, 3)), _WEIGHTS, short="pvt_v2_b2", drop_path=0.1,
                official_configs={
                    "mask_rcnn_3x": _CONFIGS + "mask_rcnn_pvt_v2_b2_fpn_3x_mstrain.py",
                    "cascade_mask_rcnn_3x": _CONFIGS + "cascade_mask_rcnn_pvt_v2_b2_fpn_3x_mstrain_fp16.py"},
                published_ap={"retinanet_1x": "44.6", "mask_rcnn_1x": "45.3 / 41.2",
                              "cascade_mask_rcnn_3x": "51.1 / 44.4"},
                published_params={"retinanet_1x": 35.1, "mask_rcnn_1x": 45.0, "cascade_mask_rcnn_3x": 83.0}),
        Variant("pvt_v2_b2_li", dict(_B, depths=(3, 4, 6, 3), linear=True), _WEIGHTS, short="pvt_v2_b2_li",
                drop_path=0.1,
                official_configs={
                    "mask_rcnn_3x": _CONFIGS + "mask_rcnn_pvt_v2_b2_li_fpn_3x_mstrain.py",
                    "cascade_mask_rcnn_3x": _CONFIGS + "cascade_mask_rcnn_pvt_v2_b2_li_fpn_3x_mstrain_fp16.py"},
                published_ap={"retinanet_1x": "43.6", "mask_rcnn_1x": "44.1 / 40.5",
                              "cascade_mask_rcnn_3x": "50.9 / 44.0"},
                published_params={"retinanet_1x": 32.3, "mask_rcnn_1x": 42.2, "cascade_mask_rcnn_3x": 80.0}),
        Variant("pvt_v2_b3", dict(_B, depths=(3, 4, 18, 3)), _WEIGHTS, short="pvt_v2_b3", drop_path=0.1,
                published_ap={"retinanet_1x": "45.9", "mask_rcnn_1x": "47.0 / 42.5"},
                published_params={"retinanet_1x": 55.0, "mask_rcnn_1x": 64.9}),
        Variant("pvt_v2_b4", dict(_B, depths=(3, 8, 27, 3)), _WEIGHTS, short="pvt_v2_b4", drop_path=0.1,
                small_batch=_SMALL_BATCH, published_params={"retinanet_1x": 72.3, "mask_rcnn_1x": 82.2}),
        Variant("pvt_v2_b5", dict(_B, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)), _WEIGHTS, short="pvt_v2_b5",
                drop_path=0.1, small_batch=_SMALL_BATCH,
                published_params={"retinanet_1x": 91.7, "mask_rcnn_1x": 101.6}),
    ),
    official_configs=PVT_REPO_1X_CONFIGS,
    paper='W. Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer", Computational Visual '
          'Media 2022',
    cite="Wang et al., CVMJ 2022", params_source="PVT v2 Tables 3-4"))

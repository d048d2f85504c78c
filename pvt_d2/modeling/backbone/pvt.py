"""PVT v1: Pyramid Vision Transformer (Wang et al., ICCV 2021).

Four stages, each a non-overlapping patch embedding (a conv with
kernel = stride = 4 in the first stage and 2 afterwards, then LayerNorm), a
learned absolute position embedding and transformer blocks whose attention is
spatial-reduction attention (SRA, :class:`~.layers.SpatialReductionAttention`):
keys and values come from the map shrunk by ``sr_ratio`` (8, 4, 2, 1).

Any input size: the input of each patch embedding is zero-padded on the
bottom/right to a multiple of the patch size, so stage ``i`` has exactly
``ceil(H / stride_i)`` x ``ceil(W / stride_i)`` tokens. The position
embeddings keep the shape they were trained with at 224 px (56x56, 28x28,
14x14 and 7x7 tokens, plus a class-token slot in stage 4) and are resized
bilinearly to the current grid on every forward; the class-token slot is
dropped because detection has no class token.

The block (:class:`PVTBlock`) is also PVT v2's and Twins PCPVT's, with the
MLP variant selected by arguments.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn

from .base import PyramidBackbone, checkpoint_block, drop_path_rates
from .export_ops import tokens_to_map
from .layers import Mlp, PatchEmbed, SpatialReductionAttention, init_weights, resize_pos_embed
from .key_mapping import (
    FamilyMapping,
    identity,
    pyramid_hparams,
    pyramid_hparams_of_kwargs,
    regex_renamer,
    register_mapping,
)
from .manifest import FamilyManifest, Variant, Weights, register_family

__all__ = ["Mlp", "PVTBlock", "PyramidVisionTransformer"]


class PVTBlock(nn.Module):
    """Pre-norm transformer block with spatial-reduction attention.

    Args:
        dim: token channels.
        num_heads: attention heads.
        mlp_ratio: MLP hidden size relative to ``dim``.
        sr_ratio: spatial reduction ratio of the attention.
        drop_path: stochastic depth rate of this block.
        linear: PVT v2 "li" attention (pooling reduction) and MLP ReLU.
        dwconv: PVT v2 MLP with a depthwise conv.
        norm_eps: epsilon of the two block LayerNorms.
    """

    act_checkpoint = False  # see PyramidBackbone.set_act_checkpoint

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float = 0.0,
                 linear: bool = False, dwconv: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio=sr_ratio, linear=linear)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dwconv=dwconv, extra_relu=linear)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class AbsolutePositionEmbedding(nn.Module):
    """A learned position embedding for a fixed grid, resized to any grid on use.

    Args:
        dim: channels.
        grid: the grid size it is learned for (at the 224 px pretraining size).
        num_prefix_tokens: extra leading slots (PVT's stage-4 class token), kept
            so that ImageNet checkpoints load, and ignored in the forward.
    """

    def __init__(self, dim: int, grid: Tuple[int, int], num_prefix_tokens: int = 0):
        super().__init__()
        self.grid = tuple(grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.weight = nn.Parameter(torch.zeros(1, num_prefix_tokens + grid[0] * grid[1], dim))
        trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return x + resize_pos_embed(self.weight, self.grid, hw, self.num_prefix_tokens)


class PVTStage(nn.Module):
    """Patch embedding, position embedding and the blocks of one PVT stage."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, pos_grid: Tuple[int, int], num_prefix_tokens: int,
                 blocks: List[nn.Module], drop_rate: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.pos_embed = AbsolutePositionEmbedding(dim, pos_grid, num_prefix_tokens)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self.patch_embed(x)
        x = self.pos_drop(self.pos_embed(x, hw))
        for blk in self.blocks:
            x = checkpoint_block(blk, x, hw)
        return tokens_to_map(x, hw)


class PyramidVisionTransformer(PyramidBackbone):
    """PVT v1 as a detectron2 backbone producing ``res2``-``res5``.

    Args:
        embed_dims: channels of the four stages.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratios: MLP expansion per stage.
        sr_ratios: spatial-reduction ratio per stage.
        in_chans: image channels.
        pretrain_img_size: image size the position embeddings were learned at.
        drop_rate: dropout after the position embedding.
        drop_path_rate: stochastic depth of the last block.
        out_features: levels to return.
        output_norm: LayerNorm on each returned level.
        freeze_at: see :class:`~.base.PyramidBackbone`.
    """

    no_weight_decay_keywords = ("pos_embed",)  # position embeddings: no weight decay

    def __init__(self, embed_dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), in_chans: int = 3, pretrain_img_size: int = 224,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 out_features: Optional[Sequence[str]] = None, output_norm: bool = False, freeze_at: int = 0):
        super().__init__()
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, prev, stride = [], in_chans, 1
        for i in range(4):
            patch = 4 if i == 0 else 2
            stride *= patch
            grid = (pretrain_img_size // stride, pretrain_img_size // stride)
            blocks = [PVTBlock(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], drop_path=dpr[i][j])
                      for j in range(depths[i])]
            stages.append(PVTStage(prev, embed_dims[i], patch, grid, 1 if i == 3 else 0, blocks, drop_rate))
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.apply(init_weights)
        self._init_pyramid(embed_dims, out_features=out_features, output_norm=output_norm, freeze_at=freeze_at)

    def frozen_modules(self, freeze_at: int) -> List[nn.Module]:
        modules = [self.stages[0].patch_embed, self.stages[0].pos_embed]
        for i in range(min(freeze_at - 1, 4)):
            modules.append(self.stages[i])
            if i + 1 < 4:
                modules += [self.stages[i + 1].patch_embed, self.stages[i + 1].pos_embed]
        return modules

    def forward_features(self, x: torch.Tensor, needed: Sequence[str]) -> Dict[str, torch.Tensor]:
        return self.run_stages(x, self.stages, needed)


# ---------------------------------------------------------------------------
# Checkpoints: whai362/PVT classification/pvt.py, and ours (timm has no PVT v1)
# ---------------------------------------------------------------------------
#: whai362/PVT ``pvt.py`` names to ``stages.{i}.patch_embed/pos_embed/blocks``; drops norm, cls_token, head.
convert_official = regex_renamer([
    (r"patch_embed(\d)\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.patch_embed.{m[2]}"),
    (r"pos_embed(\d)", lambda m: f"stages.{int(m[1]) - 1}.pos_embed.weight"),
    (r"block(\d)\.(\d+)\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}"),
], drop=("cls_token", "norm.", "head."))


def hparams_of_state_dict(state_dict):
    """Depths, widths and MLP ratios read from a pvt_d2 PVT v1 state dict."""
    return pyramid_hparams(state_dict, r"stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight",
                           "stages.{i}.patch_embed.norm.weight", "stages.{i}.blocks.0.mlp.fc1.weight")


CHECKPOINT_MAPPING = register_mapping(FamilyMapping(
    "pvt", "PVT v1",
    markers={"official": (r"^patch_embed1\.proj\.weight$", r"^pos_embed1$"),
             "pvt_d2": (r"^stages\.0\.patch_embed\.proj\.weight$", r"^stages\.0\.pos_embed\.weight$")},
    converters={"official": convert_official, "pvt_d2": identity},
    hparams=hparams_of_state_dict, hparams_of_kwargs=pyramid_hparams_of_kwargs))


# ---------------------------------------------------------------------------
# Variants: architecture, ImageNet weights (whai362/PVT release v2), detection and published numbers
# ---------------------------------------------------------------------------
_CONFIGS = "whai362/PVT detection/configs/"
#: The 1x detection configs of whai362/PVT, for PVT v1 and v2 alike ({v}: the variant's name there).
PVT_REPO_1X_CONFIGS = {"retinanet_1x": _CONFIGS + "retinanet_{v}_fpn_1x_coco.py",
                       "mask_rcnn_1x": _CONFIGS + "mask_rcnn_{v}_fpn_1x_coco.py"}
_WEIGHTS = Weights("https://github.com/whai362/PVT/releases/download/v2/{arch}.pth", "{arch}.pth")

MANIFEST = register_family(FamilyManifest(
    PyramidVisionTransformer, CHECKPOINT_MAPPING,
    variants=(
        Variant("pvt_tiny", dict(depths=(2, 2, 2, 2)), _WEIGHTS, short="pvt_t", drop_path=0.1, official_name="pvt_t",
                published_ap={"retinanet_1x": "36.7", "retinanet_3x": "39.4", "mask_rcnn_1x": "36.7 / 35.1",
                              "mask_rcnn_3x": "39.8 / 37.4"},
                published_params={"retinanet_1x": 23.0, "mask_rcnn_1x": 32.9}),
        Variant("pvt_small", dict(depths=(3, 4, 6, 3)), _WEIGHTS, short="pvt_s", drop_path=0.1, official_name="pvt_s",
                published_ap={"retinanet_1x": "40.4", "retinanet_3x": "42.2", "mask_rcnn_1x": "40.4 / 37.8",
                              "mask_rcnn_3x": "43.0 / 39.9"},
                published_params={"retinanet_1x": 34.2, "mask_rcnn_1x": 44.1}),
        # whai362/PVT detection/pvt.py: pvt_medium / pvt_large set no drop path
        Variant("pvt_medium", dict(depths=(3, 4, 18, 3)), _WEIGHTS, short="pvt_m", drop_path=0.0,
                official_name="pvt_m",
                published_ap={"retinanet_1x": "41.9", "retinanet_3x": "43.2", "mask_rcnn_1x": "42.0 / 39.0",
                              "mask_rcnn_3x": "44.2 / 40.5"},
                published_params={"retinanet_1x": 53.9, "mask_rcnn_1x": 63.9}),
        Variant("pvt_large", dict(depths=(3, 8, 27, 3)), _WEIGHTS, short="pvt_l", drop_path=0.0, official_name="pvt_l",
                small_batch=("mask_rcnn_1x",),
                published_ap={"retinanet_1x": "42.6", "retinanet_3x": "43.4", "mask_rcnn_1x": "42.9 / 39.5",
                              "mask_rcnn_3x": "44.5 / 40.7"},
                published_params={"retinanet_1x": 71.1, "mask_rcnn_1x": 81.0}),
    ),
    official_configs=PVT_REPO_1X_CONFIGS,
    paper='W. Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without '
          'Convolutions", ICCV 2021',
    cite="Wang et al., ICCV 2021", params_source="PVT v1 Table 3"))

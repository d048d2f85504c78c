"""Twins (PCPVT and SVT) as detectron2 backbones.

Twins revisits the attention of pyramid vision transformers in two ways, both
built on the four-stage layout of PVT (non-overlapping patch embeddings of
stride 4, 2, 2, 2, giving ``res2``..``res5`` at strides 4, 8, 16, 32):

* **PCPVT** keeps PVT v1's blocks (every block uses spatial-reduction
  attention, :class:`~.layers.SpatialReductionAttention`) but drops the
  absolute position embedding and the class token. Position information comes
  from a *position encoding generator* (PEG): a 3x3 depthwise convolution with
  a residual connection, applied once per stage right after its first block.
* **SVT** alternates two kinds of attention inside each stage: blocks at even
  indices use *locally-grouped* attention (full attention inside
  non-overlapping 7x7 windows), blocks at odd indices use *global sub-sampled*
  attention, which is the same spatial-reduction attention as PCPVT. It has
  the same PEG after the first block of each stage.

The official detection code of SVT also normalizes the output of every stage
with a LayerNorm *inside the trunk* (the normalized map is both the returned
feature and the input of the next stage). This is the ``extra_norm`` option,
on by default for the SVT variants and off for PCPVT; its modules are named
``norm_list.{i}`` like the official detection checkpoints. timm's
``features_only`` Twins has no such norm, so parity with timm is checked with
``extra_norm=False``.

Any input size: each patch embedding zero-pads its input at the bottom/right
to a multiple of its patch size before the strided convolution, so stage ``i``
has exactly ``ceil(H / stride_i)`` x ``ceil(W / stride_i)`` tokens. The
locally-grouped attention pads the token grid to a multiple of the window with
zero tokens, attends inside every window without a mask (the padded tokens
take part as keys and values, as in the reference implementation) and crops
back. The sub-sampled attention drops a border that does not fill a whole
reduction cell, as the reference does. Images down to 1x1 pixel work. On
sizes that are multiples of 32 the result is identical to timm's ``twins_*``
models, which floor instead of pad.

Parameter names follow timm's (and the official) classifier exactly; a timm
``twins_*`` state dict loads with ``strict=True`` once the classifier keys
(``norm.*`` and ``head.*``, see :func:`~.key_mapping.drop_classifier_keys`) are removed.
"""
import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.layers import DropPath
from torch import nn

from .base import LEVEL_NAMES, PyramidBackbone, checkpoint_block, drop_path_rates
from .export_ops import map_to_tokens, tokens_to_map, window_partition, window_unpartition
from .layers import Mlp, PatchEmbed, SpatialReductionAttention, attention, conv_input, init_weights
from .key_mapping import (
    CLASSIFIER_KEY_PREFIXES,
    FamilyMapping,
    dropping,
    pyramid_hparams,
    pyramid_hparams_of_kwargs,
    register_mapping,
)
from .manifest import FamilyManifest, Option, Variant, Weights, register_family

__all__ = [
    "Twins",
    "LocallyGroupedAttention",
    "PositionEncodingGenerator",
    "TwinsBlock",
]


class LocallyGroupedAttention(nn.Module):
    """Multi-head self-attention restricted to non-overlapping square windows.

    The token grid is zero-padded to a multiple of ``window_size``; the padded
    positions are projected like any other token (so they carry the biases)
    and are visible to the real tokens of their window, without a mask. The
    result is cropped back to the original grid before the output projection.

    Args:
        dim: channels of the tokens.
        num_heads: attention heads.
        window_size: side of a window.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Attend inside windows of ``x`` (``(B, H*W, C)`` tokens on grid ``hw``)."""
        b, n, c = x.shape
        # (B, windows, ws*ws, C): the image and window axes stay apart, the batch
        # layout of the reference, so the attention products sum identically.
        out = self.attend_windows(window_partition(x.view(b, hw[0], hw[1], c), self.window_size))
        out = window_unpartition(out, self.window_size, hw)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))

    def attend_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Attention (before ``proj``) of ``(B, windows, ws*ws, C)`` windows, same shape out.

        A method of its own so that ``qkv``, the largest tensor of the block (3x
        the tokens), is released when it returns, before the window merge and
        ``proj`` allocate theirs (a lower peak of memory).
        """
        b, num_windows, n, c = windows.shape
        q, k, v = self.split_qkv(windows)
        return self.attend(q, k, v).transpose(2, 3).reshape(b, num_windows, n, c)

    def split_qkv(self, windows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``qkv`` of the windows as three ``(B, windows, heads, ws*ws, C/heads)`` tensors."""
        b, num_windows, n, c = windows.shape
        qkv = self.qkv(windows).reshape(b, num_windows, n, 3, self.num_heads, c // self.num_heads)
        return qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention over the last two axes of 5-d inputs.

        The products of :func:`~torch.nn.functional.scaled_dot_product_attention`'s
        reference ("math") kernel, which SDPA runs on 5-d inputs (query and key
        each scaled by the root of the scale), without its passes for fully
        masked rows: there is no mask here.
        """
        scale = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
        return attention(q, k, v, scale, key_scale=scale, dropout=self.attn_drop if self.training else 0.0)


class PositionEncodingGenerator(nn.Module):
    """Conditional position encoding: ``x + DepthwiseConv3x3(x)`` on the token grid.

    Args:
        dim: channels of the tokens.
    """

    def __init__(self, dim: int):
        super().__init__()
        # A one-element Sequential keeps the reference key names (proj.0.*).
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        feat = conv_input(tokens_to_map(x, hw))
        return map_to_tokens(self.proj(feat) + feat)


class TwinsBlock(nn.Module):
    """Pre-norm transformer block with either local-window or sub-sampled attention.

    Args:
        dim: channels of the tokens.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        sr_ratio: spatial reduction of the sub-sampled attention.
        window_size: use locally-grouped attention in windows of this side;
            ``None`` uses (global) spatial-reduction attention.
        drop_path: stochastic depth rate of both residual branches.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the attention projection and in the MLP.
    """

    act_checkpoint = False  # see PyramidBackbone.set_act_checkpoint

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, sr_ratio: int = 1,
                 window_size: Optional[int] = None, drop_path: float = 0.0,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if window_size is None:
            self.attn = SpatialReductionAttention(
                dim, num_heads, sr_ratio=sr_ratio, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        else:
            self.attn = LocallyGroupedAttention(
                dim, num_heads, window_size=window_size, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), hw))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Twins(PyramidBackbone):
    """Twins-PCPVT / Twins-SVT backbone producing ``res2``..``res5``.

    Args:
        embed_dims: channels of the four stages.
        num_heads: attention heads of the four stages.
        mlp_ratios: MLP expansion of the four stages.
        depths: blocks per stage.
        sr_ratios: spatial reduction of the sub-sampled attention per stage.
        window_sizes: SVT's local window side per stage; ``None`` builds PCPVT
            (every block uses sub-sampled attention).
        extra_norm: LayerNorm on every stage output inside the trunk (official
            SVT detection design); ``None`` picks the variant's default.
        patch_size: side of the first patch embedding (later ones use 2).
        in_chans: image channels.
        out_features: levels to return (default ``res2``-``res5``).
        drop_path_rate: stochastic depth of the last block, linear from 0.
        attn_drop_rate: dropout on attention weights.
        proj_drop_rate: dropout after projections and in the MLPs.
        output_norm: extra LayerNorm on each returned level (see
            :class:`~.base.PyramidBackbone`), independent of ``extra_norm``.
        freeze_at: see :class:`~.base.PyramidBackbone`.
    """

    no_weight_decay_keywords = ("pos_block",)  # PEG convs: no weight decay, as the official 3x configs

    def __init__(self, embed_dims: Sequence[int], num_heads: Sequence[int], mlp_ratios: Sequence[float],
                 depths: Sequence[int], sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 window_sizes: Optional[Sequence[int]] = None, extra_norm: Optional[bool] = None,
                 patch_size: int = 4, in_chans: int = 3, out_features: Optional[Sequence[str]] = None,
                 drop_path_rate: float = 0.0, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 output_norm: bool = False, freeze_at: int = 0):
        super().__init__()
        num_stages = len(depths)
        if extra_norm is None:
            extra_norm = window_sizes is not None
        self.depths = tuple(depths)
        self.window_sizes = tuple(window_sizes) if window_sizes is not None else None

        self.patch_embeds = nn.ModuleList()
        prev_dim = in_chans
        for i, dim in enumerate(embed_dims):
            # The reference's NCHW patch convs keep the results bit-identical to it.
            self.patch_embeds.append(PatchEmbed(prev_dim, dim, patch_size if i == 0 else 2, nchw_conv=True))
            prev_dim = dim

        dpr = drop_path_rates(drop_path_rate, depths)
        self.blocks = nn.ModuleList()
        for i in range(num_stages):
            self.blocks.append(nn.ModuleList([
                TwinsBlock(
                    embed_dims[i], num_heads[i], mlp_ratio=mlp_ratios[i], sr_ratio=sr_ratios[i],
                    window_size=self._window_of_block(i, j), drop_path=dpr[i][j],
                    attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
                for j in range(depths[i])
            ]))
        self.pos_block = nn.ModuleList([PositionEncodingGenerator(dim) for dim in embed_dims])
        self.norm_list = nn.ModuleList(
            [nn.LayerNorm(dim, eps=1e-6) for dim in embed_dims]) if extra_norm else None

        self.apply(init_weights)

        names = LEVEL_NAMES[:num_stages]
        self._init_pyramid(
            channels=dict(zip(names, embed_dims)),
            strides={name: patch_size * 2 ** i for i, name in enumerate(names)},
            out_features=out_features, output_norm=output_norm, freeze_at=freeze_at, min_input_size=1)

    def _window_of_block(self, stage: int, index: int) -> Optional[int]:
        """Window side of a block, or ``None`` for sub-sampled attention."""
        if self.window_sizes is None or index % 2 == 1:
            return None
        return self.window_sizes[stage]

    @classmethod
    def family_kwargs_from_cfg(cls, cfg) -> dict:
        """Family options from ``MODEL.PVT_D2.TWINS``.

        ``EXTRA_NORM``: ``None`` keeps the variant's default (on for SVT, off
        for PCPVT); ``True`` / ``False`` forces it.
        """
        extra_norm = cfg.MODEL.PVT_D2.TWINS.EXTRA_NORM
        return {} if extra_norm is None else {"extra_norm": bool(extra_norm)}

    def _stage_modules(self, i: int) -> List[nn.Module]:
        modules = [self.patch_embeds[i], self.blocks[i], self.pos_block[i]]
        if self.norm_list is not None:
            modules.append(self.norm_list[i])
        return modules

    def frozen_modules(self, freeze_at: int) -> List[nn.Module]:
        """``1``: the first patch embedding; ``k >= 2``: the stages producing res2..res{k}."""
        if freeze_at <= 0:
            return []
        if freeze_at == 1:
            return [self.patch_embeds[0]]
        modules = []
        for i in range(min(freeze_at - 1, len(self.depths))):
            modules += self._stage_modules(i)
        return modules

    def forward_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i``: patch embedding, blocks (the PEG after the first), optional norm; map in, map out.

        The official module lists (``patch_embeds``, ``blocks``, ``pos_block``,
        ``norm_list``) keep the checkpoint layout, so a stage is this method
        rather than a module of its own.
        """
        tokens, hw = self.patch_embeds[i](x)
        for j, block in enumerate(self.blocks[i]):
            tokens = checkpoint_block(block, tokens, hw)
            if j == 0:
                tokens = self.pos_block[i](tokens, hw)
        if self.norm_list is not None:
            tokens = self.norm_list[i](tokens)
        return tokens_to_map(tokens, hw)  # channels-last view: the next patch embedding's conv keeps it

    def forward_features(self, x: torch.Tensor, needed: Sequence[str]) -> Dict[str, torch.Tensor]:
        stages = [functools.partial(self.forward_stage, i) for i in range(len(self.depths))]
        return self.run_stages(x, stages, needed)


# ---------------------------------------------------------------------------
# Checkpoints: Meituan-AutoML/Twins gvt.py and timm's twins share our names
# ---------------------------------------------------------------------------
def hparams_of_state_dict(state_dict):
    """Depths, widths, MLP ratios and PCPVT / SVT read from a Twins state dict."""
    hp = pyramid_hparams(state_dict, r"blocks\.(\d+)\.(\d+)\.norm1\.weight",
                         "patch_embeds.{i}.norm.weight", "blocks.{i}.0.mlp.fc1.weight")
    # SVT's even blocks use locally-grouped attention (a fused qkv); PCPVT has none
    return {**hp, "svt": "blocks.0.0.attn.qkv.weight" in state_dict}


def hparams_of_kwargs(kw):
    return {**pyramid_hparams_of_kwargs(kw), "svt": kw.get("window_sizes") is not None}


CHECKPOINT_MAPPING = register_mapping(FamilyMapping(
    "twins", "Twins",
    markers={"official": (r"^patch_embeds\.0\.proj\.weight$", r"^pos_block\.0\.proj\.0\.weight$")},
    # official and timm name everything as we do; only the classifier goes
    converters={"official": dropping(*CLASSIFIER_KEY_PREFIXES), "timm": dropping(*CLASSIFIER_KEY_PREFIXES)},
    hparams=hparams_of_state_dict, hparams_of_kwargs=hparams_of_kwargs,
    # the per-stage LayerNorms of SVT's detection design are not in ImageNet classifiers
    new_prefixes=("norm_list.",)))


# ---------------------------------------------------------------------------
# Variants: architecture, ImageNet weights, detection and published numbers
# ---------------------------------------------------------------------------
_CONFIGS = "Meituan-AutoML/Twins detection/configs/"
# the authors' README links Google Drive only (no direct download): timm's Hugging Face copies of the same weights
_WEIGHTS = Weights("https://huggingface.co/timm/{arch}.in1k/resolve/main/model.safetensors", "{arch}.in1k.safetensors",
                   "timm", note="the authors' README links Google Drive only; timm's copy of the same weights")
_PCPVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
              sr_ratios=(8, 4, 2, 1), window_sizes=None, extra_norm=False)
_SVT = dict(mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1), window_sizes=(7, 7, 7, 7), extra_norm=True)
_DROP_PATH = 0.2  # Twins detection/gvt.py: 0.2 for every variant

MANIFEST = register_family(FamilyManifest(
    Twins, CHECKPOINT_MAPPING,
    variants=(
        Variant("twins_pcpvt_small", dict(_PCPVT, depths=(3, 4, 6, 3)), _WEIGHTS, short="twins_pcpvt_s",
                drop_path=_DROP_PATH, official_name="pcpvt_s",
                published_ap={"retinanet_1x": "43.0", "retinanet_3x": "45.2", "mask_rcnn_1x": "42.9 / 40.0",
                              "mask_rcnn_3x": "46.8 / 42.6"},
                published_params={"retinanet_1x": 34.4, "mask_rcnn_1x": 44.3}),
        Variant("twins_pcpvt_base", dict(_PCPVT, depths=(3, 4, 18, 3)), _WEIGHTS, short="twins_pcpvt_b",
                drop_path=_DROP_PATH, official_name="pcpvt_b",
                published_ap={"retinanet_1x": "44.3", "retinanet_3x": "46.4", "mask_rcnn_1x": "44.6 / 40.9",
                              "mask_rcnn_3x": "47.9 / 43.2"},
                published_params={"retinanet_1x": 54.1, "mask_rcnn_1x": 64.0}),
        Variant("twins_pcpvt_large", dict(_PCPVT, depths=(3, 8, 27, 3)), _WEIGHTS, short="twins_pcpvt_l",
                drop_path=_DROP_PATH, official_name="pcpvt_l", official_configs={"mask_rcnn_3x": None},
                published_params={"retinanet_1x": 71.2, "mask_rcnn_1x": 81.2}),
        Variant("twins_svt_small", dict(_SVT, embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16),
                                        depths=(2, 2, 10, 4)),
                _WEIGHTS, short="twins_svt_s", drop_path=_DROP_PATH, official_name="alt_gvt_s",
                published_ap={"retinanet_1x": "43.0", "retinanet_3x": "45.6", "mask_rcnn_1x": "43.4 / 40.3",
                              "mask_rcnn_3x": "46.8 / 42.6"},
                published_params={"retinanet_1x": 34.3, "mask_rcnn_1x": 44.0}),
        Variant("twins_svt_base", dict(_SVT, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24),
                                       depths=(2, 2, 18, 2)),
                _WEIGHTS, short="twins_svt_b", drop_path=_DROP_PATH, official_name="alt_gvt_b",
                published_ap={"retinanet_1x": "45.3", "retinanet_3x": "46.9", "mask_rcnn_1x": "45.2 / 41.5",
                              "mask_rcnn_3x": "48.0 / 43.0"},
                published_params={"retinanet_1x": 67.0, "mask_rcnn_1x": 76.3}),
        Variant("twins_svt_large", dict(_SVT, embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
                                        depths=(2, 2, 18, 2)),
                _WEIGHTS, short="twins_svt_l", drop_path=_DROP_PATH, official_name="alt_gvt_l",
                published_params={"retinanet_1x": 110.9, "mask_rcnn_1x": 119.7}),
    ),
    official_configs={"retinanet_1x": _CONFIGS + "retinanet_{v}_fpn_1x_coco_pvt_setting.py",
                      "mask_rcnn_1x": _CONFIGS + "mask_rcnn_{v}_fpn_1x_coco_pvt_setting.py",
                      "mask_rcnn_3x": _CONFIGS + "mask_rcnn_{v}_fpn_3x_coco_swin_setting.py"},
    modelled_on={"mask_rcnn_3x": _CONFIGS + "mask_rcnn_pcpvt_b_fpn_3x_coco_swin_setting.py"},
    options=(Option("EXTRA_NORM", choices=(True, False), allowed="use None (the variant's default), True or False"),),
    paper='X. Chu et al., "Twins: Revisiting the Design of Spatial Attention in Vision Transformers", NeurIPS 2021',
    cite="Chu et al., NeurIPS 2021", params_source="Twins Table 5", published_params_include_classifier=True))

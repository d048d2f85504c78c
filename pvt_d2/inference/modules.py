"""The prepared modules: each one is a plain model module with its inference kernels.

Each class subclasses the model module it replaces (same parameters, buffers
and state-dict keys) and overrides only the methods it speeds up; wherever
autograd records or a graph is being recorded it runs the plain code.
:data:`SWAPS` maps every plain type to its prepared type.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.backbone import gcvit, layers, levit, pvt, twins, vip
from ..modeling.backbone.export_ops import is_tracing, map_to_tokens, tokens_to_map
from .cache import CacheOwner, cached
from .kernels import (
    FUSED_ACTIVATIONS,
    attention_chunks,
    bf16_attention,
    even_step,
    image_by_image,
    inference_inplace,
    is_cpu_bf16_inference,
    linear_act,
    packed_linear,
    residual_add,
)

__all__ = ["SWAPS", "FastMlp", "batchnorm_affine"]


def _no_graph(module: nn.Module) -> bool:
    """Nothing is recorded and autograd needs none of ``module``'s parameters."""
    return not is_tracing() and not (torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))


# ---------------------------------------------------------------------------
# Shared layers (PVT, PVT v2, Twins, GC ViT)
# ---------------------------------------------------------------------------
class FastMlp(layers.Mlp):
    """:class:`~pvt_d2.modeling.backbone.layers.Mlp` with a fused GELU and, on large inputs, chunks.

    Inference on a large input runs the MLP over chunks of about
    :attr:`chunk_numel` hidden activations: runs of tokens, or with the
    depthwise conv whole images or bands of image rows (plus one halo row
    above and below), so the hidden activations (4-8x the tokens) never exist
    in full and stay in cache. Each output token sees exactly the operands of
    the whole-tensor computation: bit-identical in practice. The GELU runs
    inside ``fc1``'s GEMM when it follows ``fc1`` directly, otherwise in place.
    """

    packed_linears = ("fc1", "fc2")
    #: Hidden activations per chunk (elements; 4 MB in float32).
    chunk_numel = 2 ** 20
    #: Only MLPs whose whole hidden tensor has more elements than this are chunked.
    min_chunked_numel = 6 * 2 ** 20
    #: Fewest image rows per band (the halo rows are computed twice).
    min_band_rows = 12

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        # inference_inplace first: it is False while recording, so no size test enters a traced graph
        if not inference_inplace(x) or (self.training and self.drop.p > 0):
            return super().forward(x, hw)
        if x.numel() // x.shape[-1] * self.fc1.out_features > self.min_chunked_numel and x.is_contiguous():
            return self._forward_chunked(x, hw)
        if self.fused_gelu():
            return self.fc2(linear_act(self.fc1, x, "gelu"))
        x = self.relu(self.fc1(x))
        if self.dwconv is not None:
            x = map_to_tokens(self.dwconv(tokens_to_map(x, hw)))
        return self.fc2(self._gelu_(x) if x.is_contiguous() else self.act(x))

    def fused_gelu(self) -> bool:
        """Whether the GELU follows ``fc1`` directly, so that ``fc1`` can apply it."""
        return self.dwconv is None and isinstance(self.relu, nn.Identity) and self.act.approximate == "none"

    def _gelu_(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_(hidden, approximate=self.act.approximate)

    def _forward_chunked(self, x: torch.Tensor, hw: Optional[Tuple[int, int]]) -> torch.Tensor:
        """Chunks of tokens, whole images or bands of image rows."""
        chunk = max(1, self.chunk_numel // self.fc1.out_features)  # tokens
        if self.dwconv is None:  # any leading dimensions
            tokens = x.view(-1, x.shape[-1])
            step = even_step(tokens.shape[0], chunk)
            out = None
            fused = self.fused_gelu()
            for start in range(0, tokens.shape[0], step):
                part = tokens[start:start + step]
                # no name holds the hidden chunk: it is freed before the next one is made, which then
                # reuses its memory, still in cache (two alternating buffers cost ~5% in stage 1)
                y = self.fc2(linear_act(self.fc1, part, "gelu") if fused else self._gelu_(self.relu(self.fc1(part))))
                if out is None:  # the dtype of the result (autocast)
                    out = y.new_empty(tokens.shape[0], y.shape[-1])
                out[start:start + step] = y
            return out.view(*x.shape[:-1], -1)
        b, n, _ = x.shape
        h, w = hw
        if n <= chunk:  # whole images
            step = even_step(b, chunk // n)
            return torch.cat([self._band(x[i:i + step], hw, 0, h) for i in range(0, b, step)])
        step = even_step(h, max(self.min_band_rows, chunk // w))
        bands = [self._band(x[i:i + 1], hw, top, min(top + step, h)) for i in range(b) for top in range(0, h, step)]
        return torch.cat(bands, dim=1).view(b, n, -1)  # the images' bands in order

    def _band(self, x: torch.Tensor, hw: Tuple[int, int], top: int, bottom: int) -> torch.Tensor:
        """The MLP output of image rows ``top:bottom`` of ``x`` (``(B, H*W, C)`` tokens on grid ``hw``)."""
        h, w = hw
        lo, hi = max(top - 1, 0), min(bottom + 1, h)  # one halo row above and below for the 3x3 conv
        hidden = self.dwconv(tokens_to_map(self.relu(self.fc1(x[:, lo * w:hi * w])), (hi - lo, w)))
        return self.fc2(self._gelu_(map_to_tokens(hidden[:, :, top - lo:bottom - lo])))


class FastSpatialReductionAttention(layers.SpatialReductionAttention):
    """SRA whose conv reads the tokens' channels-last view (~1e-6 relative) and with bfloat16 CPU attention."""

    packed_linears = ("q", "kv", "proj")

    def reduction_input(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return tokens_to_map(x, hw) if inference_inplace(x) else super().reduction_input(x, hw)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if is_cpu_bf16_inference(q):
            b, heads, n, d = q.shape
            return bf16_attention(q, k, v, self.scale).view(b, n, heads * d)
        return super().attend(q, k, v)


class FastPatchEmbed(layers.PatchEmbed):
    """Patch embedding that convolves the previous stage's channels-last view (no NCHW copy)."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        return self.embed(x) if inference_inplace(x) else super().forward(x)


class FastPVTBlock(pvt.PVTBlock):
    """PVT block with in-place residual sums."""

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = residual_add(x, self.drop_path(self.attn(self.norm1(x), hw)))
        return residual_add(x, self.drop_path(self.mlp(self.norm2(x), hw)))


# ---------------------------------------------------------------------------
# Twins
# ---------------------------------------------------------------------------
class FastLocallyGroupedAttention(twins.LocallyGroupedAttention):
    """Window attention a few images or windows at a time (bit-identical)."""

    packed_linears = ("qkv", "proj")

    def attend_windows(self, windows: torch.Tensor) -> torch.Tensor:
        if not inference_inplace(windows):
            return super().attend_windows(windows)
        b, num_windows, n, c = windows.shape
        heads = self.num_heads
        q, k, v = self.split_qkv(windows)
        # written head-major into token-major memory (the transpose back is a view)
        out = windows.new_empty(b, num_windows, n, heads, c // heads).transpose(2, 3)
        for imgs, wins in attention_chunks(b, num_windows, heads * n * n):
            out[imgs, wins] = self.attend(q[imgs, wins], k[imgs, wins], v[imgs, wins])
        return out.transpose(2, 3).view(b, num_windows, n, c)


class FastPositionEncodingGenerator(twins.PositionEncodingGenerator):
    """PEG whose conv reads the tokens' channels-last view for one image too (~1e-6 relative)."""

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        if not inference_inplace(x):
            return super().forward(x, hw)
        feat = tokens_to_map(x, hw)
        return map_to_tokens(self.proj(feat) + feat)


class FastTwinsBlock(twins.TwinsBlock):
    """Twins block with in-place residual sums."""

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = residual_add(x, self.drop_path1(self.attn(self.norm1(x), hw)))
        return residual_add(x, self.drop_path2(self.mlp(self.norm2(x))))


# ---------------------------------------------------------------------------
# GC ViT
# ---------------------------------------------------------------------------
class FastMbConvBlock(gcvit.MbConvBlock):
    """Fused-MBConv whose GELU, squeeze-excite scaling and residual sum overwrite fresh maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x)
        if not inference_inplace(y):
            return x + self.conv_pw(self.se(self.act(y)))
        y = torch.ops.aten.gelu_(y, approximate=self.act.approximate)
        se = self.se  # timm's SEModule, its scaling in place
        y = y.mul_(se.gate(se.fc2(se.act(se.bn(se.fc1(y.mean((2, 3), keepdim=True)))))))
        return residual_add(x, self.conv_pw(y))


class FastStem(gcvit.Stem):
    """Channels-last stem run one image at a time on a batch (convs may round differently)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not inference_inplace(x):
            return super().forward(x)
        # a channels-last conv output is read by the LayerNorm that follows without a layout copy
        x = x.contiguous(memory_format=torch.channels_last)
        if x.shape[0] > 1 and inference_inplace(self.conv1.weight):
            return image_by_image(super().forward, x)
        return super().forward(x)


class FastRelativePositionBias(CacheOwner, gcvit.RelativePositionBias):
    """Relative position bias with the resized table, and a small lookup, kept while the table is unchanged."""

    #: Lookups with more values are gathered per call, as timm does.
    lookup_max_numel = 1 << 19

    def resized_table(self) -> torch.Tensor:
        table = self.relative_position_bias_table
        if self.window_size == self.pretrain_window_size or not _no_graph(self):
            return super().resized_table()
        return cached(self, "resized", (table.device, table.dtype),
                      lambda: super(FastRelativePositionBias, self).resized_table().detach(), (table,))

    def forward(self) -> torch.Tensor:
        if not _no_graph(self):
            return super().forward()
        table = self.relative_position_bias_table
        return cached(self, "lookup", (table.device, table.dtype, self.relative_position_index.device),
                      lambda: super(FastRelativePositionBias, self).forward().detach(),
                      (self.relative_position_bias_table,), max_numel=self.lookup_max_numel)


class FastGlobalContextAttention(gcvit.GlobalContextAttention):
    """Window attention a few images or windows at a time, bias and mask added in place (bit-identical)."""

    packed_linears = ("qkv", "proj")

    def attend_windows(self, x: torch.Tensor, q_global: Optional[torch.Tensor],
                       key_padding: Optional[torch.Tensor]) -> torch.Tensor:
        if not inference_inplace(x):
            return super().attend_windows(x, q_global, key_padding)
        b, nw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.split_qkv(x, q_global)
        bias = self.rel_pos().to(x.dtype)
        mask = None if key_padding is None else key_padding[:, None, None, :]
        out = x.new_empty(b, nw, n, heads, self.head_dim).transpose(2, 3)  # head-major into token-major memory
        for imgs, wins in attention_chunks(b, nw, heads * n * n):
            out[imgs, wins] = layers.attention(q[imgs, wins if q.shape[1] > 1 else slice(None)], k[imgs, wins],
                                               v[imgs, wins], self.scale, bias,
                                               None if mask is None else mask[wins], inplace=True)
        return out.transpose(2, 3).reshape(b, nw, n, c)


class FastGCViTBlock(gcvit.GCViTBlock):
    """GC ViT block with in-place residual sums."""

    def forward(self, x: torch.Tensor, q_global: Optional[torch.Tensor] = None,
                key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = residual_add(x, self.drop_path1(self.ls1(self._attention(self.norm1(x), q_global, key_padding))))
        return residual_add(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class FastGCViTStage(CacheOwner, gcvit.GCViTStage):
    """GC ViT stage whose padding mask is built once per grid size, and left out where nothing is padded."""

    def key_padding_mask(self, hw: Tuple[int, int], device: torch.device) -> Optional[torch.Tensor]:
        if not self.mask_padding or is_tracing():
            return super().key_padding_mask(hw, device)
        ws = self.window_size

        def build():
            padded = hw[0] % ws or hw[1] % ws
            return super(FastGCViTStage, self).key_padding_mask(hw, device) if padded else None

        return cached(self, "key_padding", (hw[0], hw[1], device), build, size=8)


# ---------------------------------------------------------------------------
# LeViT
# ---------------------------------------------------------------------------
def batchnorm_affine(bn: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` per channel, or None when ``bn`` is not fixed.

    A BatchNorm is a fixed affine map when frozen (in any mode) or when a
    plain / synchronized BatchNorm runs in eval mode on its running
    statistics; in training mode it normalises with the batch statistics.
    """
    if isinstance(bn, levit.FrozenBatchNorm2d):  # FrozenBatchNorm1d included
        weight, bias = bn.weight, bn.bias
    elif isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if bn.training or bn.running_mean is None:
            return None
        weight = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        bias = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    else:
        return None
    scale = weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bias - bn.running_mean * scale


class _FoldedBN(CacheOwner):
    """A bias-free projection ``linear`` and its BatchNorm ``bn`` folded into one projection when possible.

    Where the BatchNorm is a fixed affine map (:func:`batchnorm_affine`) the
    pair runs as one projection with weight ``W * scale`` and bias ``shift``,
    as the official LeViT code fuses its BatchNorms for inference: in float32
    the outputs differ from the unfolded ones by rounding only (~3e-6
    relative). The folded weights are derived values (the state dict is
    unchanged), kept while nothing needs a gradient and recomputed in the
    graph otherwise: while autograd records only with
    :attr:`fold_while_recording` (frozen BatchNorm in training; same
    function, same gradients).
    """

    #: Fold also while autograd records (see :func:`~pvt_d2.inference.prepare_for_inference`).
    fold_while_recording = False

    def folded(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(weight, bias)`` of the folded projection, or None."""
        bn, weight = self.bn, self.linear.weight
        sources = (weight, getattr(bn, "weight", None), getattr(bn, "bias", None), bn.running_mean, bn.running_var)
        recorded = is_tracing() or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                    for t in sources))
        if recorded and not self.fold_while_recording:
            return None

        def fold():
            affine = batchnorm_affine(bn)
            if affine is None:
                return None
            scale, shift = affine
            return weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1)), shift

        if recorded:
            return fold()
        return cached(self, "folded", (bn.training, weight.device, weight.dtype), lambda: _detached(fold()), sources)


def _detached(pair):
    return None if pair is None else tuple(t.detach() for t in pair)


class FoldedConvBN(_FoldedBN, levit.ConvBN):
    """LeViT Conv+BN with the BatchNorm folded (see :class:`_FoldedBN`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self.folded()
        if folded is None:
            return super().forward(x)
        conv = self.linear
        return F.conv2d(x, folded[0], folded[1], conv.stride, conv.padding, conv.dilation, conv.groups)


class FoldedLinearBN(_FoldedBN, levit.LinearBN):
    """LeViT Linear+BN with the BatchNorm folded into a packed GEMM (see :class:`_FoldedBN`)."""

    packed_linears = ("linear",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_act(x)

    def forward_act(self, x: torch.Tensor, activation: Optional[str] = None) -> torch.Tensor:
        """``activation(bn(linear(x)))``; ``activation`` is None or a key of :data:`~.kernels.FUSED_ACTIVATIONS`."""
        folded = self.folded()
        if folded is None:
            x = super().forward(x)
            return x if activation is None else FUSED_ACTIVATIONS[activation][0](x)
        y = packed_linear(x.reshape(-1, x.shape[-1]), folded[0], folded[1], self, activation)
        return y.view(x.shape[:-1] + (-1,))


class FastLevitMlp(levit.LevitMlp):
    """LeViT MLP with the hardswish applied by the first GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.ln1.forward_act(x, "hardswish"))


class FastLevitStem(levit.LevitStem):
    """Channels-last LeViT stem with in-place hardswish where no graph is recorded (convs round differently)."""

    def forward_res2(self, x: torch.Tensor) -> torch.Tensor:
        if not _no_graph(self):
            return super().forward_res2(x)
        x = x.contiguous(memory_format=torch.channels_last)
        return F.hardswish(self.conv2(F.hardswish(self.conv1(x), inplace=True)), inplace=True)

    def forward_res3(self, res2: torch.Tensor) -> torch.Tensor:
        y = self.conv3(res2)
        return F.hardswish(y, inplace=True) if inference_inplace(y) else self.act3(y)


class _FastOffsetBias(CacheOwner):
    """LeViT attention with its geometry and biases kept per grid, added to the scores in place."""

    #: Gathered biases with more values (global mode on large maps) are not kept.
    bias_max_numel = 1 << 22

    def geometry(self, grid, device):
        if is_tracing():
            return super().geometry(grid, device)
        grid = (int(grid[0]), int(grid[1]))
        return cached(self, "geometry", (grid, device), lambda: levit.build_tile_geometry(
            grid, self.table_size, self.stride, self.attn_mode == "window", device), size=4)

    def attention_mask(self, geo):
        table = self.attention_biases
        if is_tracing() or (torch.is_grad_enabled() and table.requires_grad):
            return super().attention_mask(geo)
        # the geometry's own tensors as sources: an entry never outlives (and so never mistakes) its geometry
        return cached(self, "mask", (table.device, table.dtype),
                      lambda: super(_FastOffsetBias, self).attention_mask(geo).detach(),
                      (table, geo.offset_y, geo.offset_x), size=4, max_numel=self.bias_max_numel)

    def attend(self, q, k, v, mask):
        out = layers.attention(q, k, v, self.scale, mask, inplace=inference_inplace(q))
        b, t, _, n, _ = out.shape
        return out.permute(0, 1, 3, 2, 4).reshape(b, t, n, -1)


class FastLevitAttention(_FastOffsetBias, levit.LevitAttention):
    """:class:`~pvt_d2.modeling.backbone.levit.LevitAttention` with :class:`_FastOffsetBias`."""


class FastShrinkAttention(_FastOffsetBias, levit.ShrinkAttention):
    """:class:`~pvt_d2.modeling.backbone.levit.ShrinkAttention` with :class:`_FastOffsetBias`."""


# ---------------------------------------------------------------------------
# ViP
# ---------------------------------------------------------------------------
class FastWeightedPermuteMLP(vip.WeightedPermuteMLP):
    """Permute-MLP whose partial last window uses the leading rows and columns of the weight.

    Zero padding contributes nothing and cropped outputs are not needed, so
    this is the padded form's function without materializing the padding.
    """

    def mix(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        if is_tracing():
            return super().mix(x, proj)
        length = self.segment_dim
        n, c = x.shape[2], x.shape[3]
        full = n - n % length
        parts = []
        if full:
            parts.append(vip.mix_windows(x[:, :, :full], proj.weight, proj.bias, length))
        if n > full:
            k = (n - full) * (c // length)
            bias = None if proj.bias is None else proj.bias[:k]
            parts.append(vip.mix_windows(x[:, :, full:], proj.weight[:k, :k], bias, length))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


#: Plain model type -> prepared type. ``nn.Linear`` children named in a prepared
#: module's ``packed_linears`` become :class:`~.kernels.PackedLinear`.
SWAPS: Dict[type, type] = {
    layers.Mlp: FastMlp,
    layers.SpatialReductionAttention: FastSpatialReductionAttention,
    layers.PatchEmbed: FastPatchEmbed,
    pvt.PVTBlock: FastPVTBlock,
    twins.LocallyGroupedAttention: FastLocallyGroupedAttention,
    twins.PositionEncodingGenerator: FastPositionEncodingGenerator,
    twins.TwinsBlock: FastTwinsBlock,
    gcvit.MbConvBlock: FastMbConvBlock,
    gcvit.Stem: FastStem,
    gcvit.RelativePositionBias: FastRelativePositionBias,
    gcvit.GlobalContextAttention: FastGlobalContextAttention,
    gcvit.GCViTBlock: FastGCViTBlock,
    gcvit.GCViTStage: FastGCViTStage,
    levit.ConvBN: FoldedConvBN,
    levit.LinearBN: FoldedLinearBN,
    levit.LevitMlp: FastLevitMlp,
    levit.LevitStem: FastLevitStem,
    levit.LevitAttention: FastLevitAttention,
    levit.ShrinkAttention: FastShrinkAttention,
    vip.WeightedPermuteMLP: FastWeightedPermuteMLP,
}

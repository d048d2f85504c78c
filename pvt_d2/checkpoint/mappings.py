"""Per-family key mappings from ImageNet checkpoints to pvt_d2 backbones.

Every family has one :class:`FamilyMapping`: for each source layout it knows

* ``markers``: regular expressions that must each match some key for a state
  dict to be recognised as that family and layout;
* a converter (one function per family and layout, below) that renames the
  keys to pvt_d2's, reshapes the few tensors whose layout differs, and drops
  what the backbone has no use for (classifier head, distillation head, the
  final classifier norm, the class token, persistent index buffers). A key it
  does not know passes through unchanged, so it shows up as *unexpected* when
  loading instead of disappearing silently;
* ``hparams``: the variant's defining numbers (depths, widths, ...) read from
  the shapes of a pvt_d2 state dict, and ``hparams_of_kwargs`` the same
  numbers from a registry entry's constructor arguments, so a checkpoint can
  be matched to a variant name and refused when it is another variant;
* ``new_prefixes``: backbone parameters that no ImageNet checkpoint has
  (expected missing), besides those a model lists itself in
  ``new_parameter_prefixes``.

Source layouts (confirmed against the official repositories):

========  =====================================================================
family    layouts
========  =====================================================================
pvt       ``official`` (whai362/PVT ``classification/pvt.py``: ``patch_embed{n}``,
          ``pos_embed{n}``, ``block{n}.{j}``, ``norm``, ``cls_token``, ``head``);
          ``pvt_d2`` (ours; timm has no PVT v1)
pvt_v2    ``official`` (whai362/PVT ``pvt_v2.py``: ``patch_embed{n}``,
          ``block{n}.{j}`` with ``mlp.dwconv.dwconv``, ``norm{n}``, ``head``);
          ``timm`` (``patch_embed``, ``stages.{i}.downsample/blocks/norm``) = ours
twins     ``official`` = ``timm`` = ours (Meituan-AutoML/Twins ``gvt.py``:
          ``patch_embeds``, ``blocks.{i}.{j}``, ``pos_block``, ``norm``, ``head``)
levit     ``official`` (facebookresearch/LeViT ``levit.py``: ``patch_embed.{0,2,4,6}``
          Conv2d_BN ``c``/``bn``, one flat ``blocks`` sequence of ``Residual(m)``
          and ``AttentionSubsample``, ``head``/``head_dist`` BN_Linear);
          ``timm`` (``stem.conv{k}``, ``stages.{i}``; also ``levit_conv_*``) = ours
gcvit     ``official`` (NVlabs/GCViT ``models/gc_vit.py``: ``patch_embed.proj`` /
          ``conv_down``, ``levels.{i}`` with the downsampler at the *end* of a
          level, ``[q_global_gen.]to_q_global.{k}``, SE as Linear, ``gamma1/2``,
          top-level ``norm``; the first generation's ``levels.{i}.to_q_global``
          adds the ``first_generation_queries`` entry); ``timm`` = ours
vip       ``official`` (Andrew-Qibin/VisionPermutator ``models/vip.py``:
          ``patch_embed.proj``, ``network.{i}``, ``norm``, ``head``) = ours
========  =====================================================================

Tables that depend on the pretraining image size (PVT v1 position
embeddings, GC ViT relative position tables, LeViT attention biases) are
kept at their ImageNet shape; the models resize them on the fly.
"""
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..modeling.backbone.gcvit import FIRST_GENERATION_QUERIES_KEY
from ..modeling.backbone.layers import CLASSIFIER_KEY_PREFIXES

__all__ = ["FamilyMapping", "MAPPINGS", "get_mapping", "resolved_kwargs"]

StateDict = Dict[str, torch.Tensor]
Converted = Tuple[StateDict, List[str]]


@dataclass(frozen=True)
class FamilyMapping:
    """How checkpoints of one family are recognised, converted and identified (see the module docstring)."""

    family: str
    display: str
    markers: Dict[str, Tuple[str, ...]]
    converters: Dict[str, Callable[[StateDict], Converted]]
    hparams: Callable[[StateDict], Dict[str, Any]]
    hparams_of_kwargs: Callable[[Dict[str, Any]], Dict[str, Any]]
    new_prefixes: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def layouts(self) -> Tuple[str, ...]:
        return tuple(self.converters)

    def detect_layout(self, keys: Sequence[str]) -> Optional[str]:
        """The first layout whose markers all match some key, or None."""
        for layout, patterns in self.markers.items():
            if all(any(re.search(p, k) for k in keys) for p in patterns):
                return layout
        return None

    def convert(self, state_dict: StateDict, layout: str) -> Converted:
        """``(pvt_d2 state dict, dropped keys)`` for a state dict in ``layout``."""
        if layout not in self.converters:
            raise KeyError(f"{self.display} has no '{layout}' layout; supported: {', '.join(self.layouts)}")
        return self.converters[layout](state_dict)


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------
KeyFn = Callable[[str, torch.Tensor], Optional[Tuple[str, torch.Tensor]]]


def _apply(state_dict: StateDict, key_fn: KeyFn) -> Converted:
    """Map every entry through ``key_fn`` (None = drop); two sources for one target is an error."""
    out: StateDict = {}
    dropped: List[str] = []
    for key, value in state_dict.items():
        mapped = key_fn(key, value)
        if mapped is None:
            dropped.append(key)
            continue
        new_key, new_value = mapped
        if new_key in out:
            raise ValueError(f"checkpoint keys map twice to '{new_key}' (second source: '{key}')")
        out[new_key] = new_value
    return out, dropped


def _dropping(*prefixes: str) -> Callable[[StateDict], Converted]:
    """A converter that keeps every key unchanged except those starting with ``prefixes``."""

    def convert(state_dict: StateDict) -> Converted:
        return _apply(state_dict, lambda k, v: None if k.startswith(prefixes) else (k, v))

    return convert


def _blocks_per_stage(state_dict: StateDict, pattern: str) -> Tuple[int, ...]:
    """Blocks per stage counted from keys matching ``pattern`` (groups: stage, block)."""
    counts: Dict[int, int] = {}
    for key in state_dict:
        m = re.fullmatch(pattern, key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            counts[stage] = max(counts.get(stage, 0), block + 1)
    return tuple(counts.get(i, 0) for i in range(max(counts) + 1)) if counts else ()


def _dim(state_dict: StateDict, key: str, axis: int = 0) -> Optional[int]:
    value = state_dict.get(key)
    return None if value is None or value.dim() <= axis else int(value.shape[axis])


def _ratio(state_dict: StateDict, key: str, dim: Optional[int]) -> Optional[float]:
    hidden = _dim(state_dict, key)
    return None if hidden is None or not dim else hidden / dim


def _tuple(values) -> Tuple:
    return tuple(values) if values is not None else None


def resolved_kwargs(model_cls: type, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A registry entry's constructor arguments with the class defaults filled in."""
    params = inspect.signature(model_cls.__init__).parameters
    out = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(kwargs)
    return out


# ---------------------------------------------------------------------------
# PVT v1
# ---------------------------------------------------------------------------
def pvt_from_official(state_dict: StateDict) -> Converted:
    """whai362/PVT ``pvt.py`` names to ``stages.{i}.patch_embed/pos_embed/blocks``; drops norm, cls_token, head."""

    def key_fn(k, v):
        if k == "cls_token" or k.startswith(("norm.", "head.")):
            return None
        m = re.fullmatch(r"patch_embed(\d)\.(.+)", k)
        if m:
            return f"stages.{int(m.group(1)) - 1}.patch_embed.{m.group(2)}", v
        m = re.fullmatch(r"pos_embed(\d)", k)
        if m:
            return f"stages.{int(m.group(1)) - 1}.pos_embed.weight", v
        m = re.fullmatch(r"block(\d)\.(\d+)\.(.+)", k)
        if m:
            return f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.{m.group(3)}", v
        return k, v

    return _apply(state_dict, key_fn)


def pvt_hparams(sd: StateDict) -> Dict[str, Any]:
    depths = _blocks_per_stage(sd, r"stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight")
    dims = tuple(_dim(sd, f"stages.{i}.patch_embed.norm.weight") for i in range(len(depths)))
    ratios = tuple(_ratio(sd, f"stages.{i}.blocks.0.mlp.fc1.weight", d) for i, d in enumerate(dims))
    return {"depths": depths, "embed_dims": dims, "mlp_ratios": ratios}


def pvt_hparams_of_kwargs(kw: Dict[str, Any]) -> Dict[str, Any]:
    return {"depths": _tuple(kw["depths"]), "embed_dims": _tuple(kw["embed_dims"]),
            "mlp_ratios": tuple(float(r) for r in kw["mlp_ratios"])}


# ---------------------------------------------------------------------------
# PVT v2
# ---------------------------------------------------------------------------
def pvt_v2_from_official(state_dict: StateDict) -> Converted:
    """whai362/PVT ``pvt_v2.py`` names to timm's (= ours); drops head."""

    def key_fn(k, v):
        if k.startswith("head."):
            return None
        m = re.fullmatch(r"patch_embed(\d)\.(.+)", k)
        if m:
            n = int(m.group(1))
            return (f"patch_embed.{m.group(2)}" if n == 1 else f"stages.{n - 1}.downsample.{m.group(2)}"), v
        m = re.fullmatch(r"block(\d)\.(\d+)\.(.+)", k)
        if m:
            rest = m.group(3).replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
            return f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.{rest}", v
        m = re.fullmatch(r"norm(\d)\.(.+)", k)
        if m:
            return f"stages.{int(m.group(1)) - 1}.norm.{m.group(2)}", v
        return k, v

    return _apply(state_dict, key_fn)


def pvt_v2_hparams(sd: StateDict) -> Dict[str, Any]:
    depths = _blocks_per_stage(sd, r"stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight")
    dims = tuple(_dim(sd, f"stages.{i}.norm.weight") for i in range(len(depths)))
    ratios = tuple(_ratio(sd, f"stages.{i}.blocks.0.mlp.fc1.weight", d) for i, d in enumerate(dims))
    # linear SRA reduces with a 1x1 conv (after pooling), the regular one with an sr x sr conv
    linear = _dim(sd, "stages.0.blocks.0.attn.sr.weight", axis=3) == 1
    return {"depths": depths, "embed_dims": dims, "mlp_ratios": ratios, "linear": linear}


def pvt_v2_hparams_of_kwargs(kw: Dict[str, Any]) -> Dict[str, Any]:
    return {**pvt_hparams_of_kwargs(kw), "linear": bool(kw.get("linear", False))}


# ---------------------------------------------------------------------------
# Twins
# ---------------------------------------------------------------------------
#: Official and timm Twins share their names with ours; only the classifier goes.
twins_from_official = _dropping(*CLASSIFIER_KEY_PREFIXES)


def twins_hparams(sd: StateDict) -> Dict[str, Any]:
    depths = _blocks_per_stage(sd, r"blocks\.(\d+)\.(\d+)\.norm1\.weight")
    dims = tuple(_dim(sd, f"patch_embeds.{i}.norm.weight") for i in range(len(depths)))
    ratios = tuple(_ratio(sd, f"blocks.{i}.0.mlp.fc1.weight", d) for i, d in enumerate(dims))
    # SVT's even blocks use locally-grouped attention (a fused qkv); PCPVT has none
    return {"depths": depths, "embed_dims": dims, "mlp_ratios": ratios, "svt": "blocks.0.0.attn.qkv.weight" in sd}


def twins_hparams_of_kwargs(kw: Dict[str, Any]) -> Dict[str, Any]:
    return {**pvt_hparams_of_kwargs(kw), "svt": kw.get("window_sizes") is not None}


# ---------------------------------------------------------------------------
# LeViT
# ---------------------------------------------------------------------------
def _levit_linear_2d(k: str, v: torch.Tensor) -> torch.Tensor:
    """timm ``levit_conv_*`` / official ``levit_c`` store the token projections as 1x1 convs; ours are Linear."""
    if k.endswith(".linear.weight") and not k.startswith("stem.") and v.dim() == 4 and v.shape[-2:] == (1, 1):
        return v[:, :, 0, 0]
    return v


def levit_from_timm(state_dict: StateDict) -> Converted:
    """timm ``levit_*`` (and ``levit_conv_*``) to ours; drops head, head_dist and the bias index buffers."""

    def key_fn(k, v):
        if k.startswith(("head.", "head_dist.")) or k.endswith("attention_bias_idxs"):
            return None
        return k, _levit_linear_2d(k, v)

    return _apply(state_dict, key_fn)


_LEVIT_ATTN = (("m.qkv.c.", "qkv.linear."), ("m.qkv.bn.", "qkv.bn."), ("m.proj.1.c.", "proj.ln.linear."),
               ("m.proj.1.bn.", "proj.ln.bn."), ("m.attention_biases", "attention_biases"))
_LEVIT_SHRINK = (("kv.c.", "kv.linear."), ("kv.bn.", "kv.bn."), ("q.1.c.", "q.ln.linear."), ("q.1.bn.", "q.ln.bn."),
                 ("proj.1.c.", "proj.ln.linear."), ("proj.1.bn.", "proj.ln.bn."),
                 ("attention_biases", "attention_biases"))
_LEVIT_MLP = (("m.0.c.", "ln1.linear."), ("m.0.bn.", "ln1.bn."), ("m.2.c.", "ln2.linear."), ("m.2.bn.", "ln2.bn."))


def _levit_block_roles(state_dict: StateDict) -> Dict[int, Tuple[str, Tuple[Tuple[str, str], ...]]]:
    """For every index of the official flat ``blocks`` sequence: its pvt_d2 prefix and renaming table.

    The sequence is, per stage, ``depth`` x (attention residual, MLP residual),
    with a shrink attention and its MLP residual between stages; the role of
    each entry is read from its keys.
    """
    indices = sorted({int(m.group(1)) for k in state_dict for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    roles = {}
    stage, block, owner = 0, -1, None
    for i in indices:
        p = f"blocks.{i}."
        if f"{p}m.qkv.c.weight" in state_dict:
            block += 1
            owner = f"stages.{stage}.blocks.{block}."
            roles[i] = (owner + "attn.", _LEVIT_ATTN)
        elif f"{p}kv.c.weight" in state_dict:
            stage, block = stage + 1, -1
            owner = f"stages.{stage}.downsample."
            roles[i] = (owner + "attn_downsample.", _LEVIT_SHRINK)
        elif f"{p}m.0.c.weight" in state_dict and owner is not None:
            roles[i] = (owner + "mlp.", _LEVIT_MLP)
    return roles


def levit_from_official(state_dict: StateDict) -> Converted:
    """facebookresearch/LeViT names to timm's (= ours); drops head, head_dist and attention_bias_idxs."""
    roles = _levit_block_roles(state_dict)

    def key_fn(k, v):
        if k.startswith(("head.", "head_dist.")) or k.endswith("attention_bias_idxs"):
            return None
        m = re.fullmatch(r"patch_embed\.(\d)\.(c|bn)\.(.+)", k)
        if m and int(m.group(1)) in (0, 2, 4, 6):
            sub = "linear" if m.group(2) == "c" else "bn"
            k = f"stem.conv{int(m.group(1)) // 2 + 1}.{sub}.{m.group(3)}"
            return k, v
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if m and int(m.group(1)) in roles:
            prefix, table = roles[int(m.group(1))]
            for old, new in table:
                if m.group(2).startswith(old):
                    k = prefix + new + m.group(2)[len(old):]
                    return k, _levit_linear_2d(k, v)
        return k, v

    return _apply(state_dict, key_fn)


def levit_hparams(sd: StateDict) -> Dict[str, Any]:
    depths = _blocks_per_stage(sd, r"stages\.(\d+)\.blocks\.(\d+)\.attn\.attention_biases")
    dims = tuple(_dim(sd, f"stages.{i}.blocks.0.mlp.ln2.linear.weight") for i in range(len(depths)))
    heads = tuple(_dim(sd, f"stages.{i}.blocks.0.attn.attention_biases") for i in range(len(depths)))
    return {"depths": depths, "embed_dims": dims, "num_heads": heads}


def levit_hparams_of_kwargs(kw: Dict[str, Any]) -> Dict[str, Any]:
    return {"depths": _tuple(kw["depths"]), "embed_dims": _tuple(kw["embed_dims"]),
            "num_heads": _tuple(kw["num_heads"])}


# ---------------------------------------------------------------------------
# GC ViT
# ---------------------------------------------------------------------------
#: Official Fused-MBConv (``conv`` Sequential: dw conv, GELU, SE, pw conv) -> timm's MbConvBlock.
_GCVIT_MBCONV = (("conv.0.", "conv_dw."), ("conv.2.fc.0.", "se.fc1."), ("conv.2.fc.2.", "se.fc2."),
                 ("conv.3.", "conv_pw."))


def _gcvit_mbconv(rest: str, prefix: str) -> Optional[str]:
    for old, new in _GCVIT_MBCONV:
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return None


def _gcvit_reduce_size(rest: str, prefix: str) -> str:
    """Official ReduceSize (norm1, conv, reduction, norm2) -> timm Downsample2d under ``prefix``."""
    return _gcvit_mbconv(rest, prefix + "conv_block.") or prefix + rest


def _gcvit_key(k: str) -> str:
    """The timm / pvt_d2 name of an official GC ViT key (unknown keys unchanged)."""
    if k.startswith("patch_embed.proj."):
        return "stem.conv1." + k[len("patch_embed.proj."):]
    if k.startswith("patch_embed.conv_down."):
        return _gcvit_reduce_size(k[len("patch_embed.conv_down."):], "stem.down.")
    if k.startswith("norm."):
        return "stages.3.norm." + k[len("norm."):]
    m = re.fullmatch(r"levels\.(\d+)\.downsample\.(.+)", k)
    if m:
        return _gcvit_reduce_size(m.group(2), f"stages.{int(m.group(1)) + 1}.downsample.")
    m = re.fullmatch(r"levels\.(\d+)\.(?:q_global_gen\.)?to_q_global\.(\d+)\.(.+)", k)
    if m:
        prefix = f"stages.{m.group(1)}.global_block.blocks.conv{int(m.group(2)) + 1}."
        return _gcvit_mbconv(m.group(3), prefix) or k
    m = re.fullmatch(r"levels\.(\d+)\.blocks\.(\d+)\.(.+)", k)
    if m:
        rest = {"gamma1": "ls1.gamma", "gamma2": "ls2.gamma"}.get(m.group(3), m.group(3))
        rest = rest.replace("attn.relative_position_bias_table", "attn.rel_pos.relative_position_bias_table")
        return f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"
    return k


def gcvit_from_official(state_dict: StateDict) -> Converted:
    """NVlabs/GCViT names to timm's (= ours); drops head and relative_position_index buffers.

    Both official generations are read: ``levels.{i}.to_q_global`` and the
    later ``levels.{i}.q_global_gen.to_q_global``. The first generation's
    weights only give its features with its query layout (see
    :mod:`pvt_d2.modeling.backbone.gcvit`), so they get the
    ``first_generation_queries`` entry, which switches the model to that
    layout when they are loaded. The official downsampler
    closes level ``i``; ours opens stage ``i + 1``. The SE layers are Linear
    officially and 1x1 convs in timm. The top-level ``norm`` is the last
    stage's norm (it produces ``res5``), so it is kept.
    """

    def key_fn(k, v):
        if k.startswith("head.") or k.endswith("relative_position_index"):
            return None
        k = _gcvit_key(k)
        if re.search(r"\.se\.fc[12]\.weight$", k) and v.dim() == 2:
            v = v[:, :, None, None]
        return k, v

    converted, dropped = _apply(state_dict, key_fn)
    if any(re.match(r"levels\.\d+\.to_q_global\.", k) for k in state_dict):
        converted[FIRST_GENERATION_QUERIES_KEY] = torch.tensor(1)
    return converted, dropped


gcvit_from_timm = _dropping("head.")


def gcvit_hparams(sd: StateDict) -> Dict[str, Any]:
    depths = _blocks_per_stage(sd, r"stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight")
    dim = _dim(sd, "stem.conv1.weight")
    heads = tuple(_dim(sd, f"stages.{i}.blocks.0.attn.rel_pos.relative_position_bias_table", axis=1)
                  for i in range(len(depths)))
    return {"embed_dim": dim, "depths": depths, "num_heads": heads,
            "mlp_ratio": _ratio(sd, "stages.0.blocks.0.mlp.fc1.weight", dim),
            "layer_scale": "stages.0.blocks.0.ls1.gamma" in sd}


def gcvit_hparams_of_kwargs(kw: Dict[str, Any]) -> Dict[str, Any]:
    return {"embed_dim": kw["embed_dim"], "depths": _tuple(kw["depths"]), "num_heads": _tuple(kw["num_heads"]),
            "mlp_ratio": float(kw["mlp_ratio"]), "layer_scale": kw.get("layer_scale") is not None}


# ---------------------------------------------------------------------------
# Vision Permutator
# ---------------------------------------------------------------------------
#: The official ViP names are ours; only the classifier goes.
vip_from_official = _dropping(*CLASSIFIER_KEY_PREFIXES)


def vip_hparams(sd: StateDict) -> Dict[str, Any]:
    """Layers, widths and transitions from the ``network`` sequence (stages and downsamplers interleaved)."""
    positions = sorted({int(m.group(1)) for k in sd for m in [re.match(r"network\.(\d+)\.", k)] if m})
    layers, dims, transitions = [], [], []
    for pos in positions:
        blocks = [int(m.group(1)) for k in sd for m in [re.fullmatch(rf"network\.{pos}\.(\d+)\.norm1\.weight", k)]
                  if m]
        if blocks:
            layers.append(max(blocks) + 1)
            dims.append(_dim(sd, f"network.{pos}.0.norm1.weight"))
            transitions.append(False)
        elif f"network.{pos}.proj.weight" in sd and transitions:
            # a 2x2 stride-2 conv halves the map; a 1x1 one only changes the width
            transitions[-1] = _dim(sd, f"network.{pos}.proj.weight", axis=3) == 2
    return {"layers": tuple(layers), "embed_dims": tuple(dims), "transitions": tuple(transitions),
            "patch_size": _dim(sd, "patch_embed.proj.weight", axis=3)}


def vip_hparams_of_kwargs(kw: Dict[str, Any]) -> Dict[str, Any]:
    return {"layers": _tuple(kw["layers"]), "embed_dims": _tuple(kw["embed_dims"]),
            "transitions": tuple(bool(t) for t in kw["transitions"]), "patch_size": kw["patch_size"]}


# ---------------------------------------------------------------------------
# Registry of mappings
# ---------------------------------------------------------------------------
def _identity(state_dict: StateDict) -> Converted:
    return dict(state_dict), []


MAPPINGS: Dict[str, FamilyMapping] = {m.family: m for m in [
    FamilyMapping(
        "pvt", "PVT v1",
        markers={"official": (r"^patch_embed1\.proj\.weight$", r"^pos_embed1$"),
                 "pvt_d2": (r"^stages\.0\.patch_embed\.proj\.weight$", r"^stages\.0\.pos_embed\.weight$")},
        converters={"official": pvt_from_official, "pvt_d2": _identity},
        hparams=pvt_hparams, hparams_of_kwargs=pvt_hparams_of_kwargs),
    FamilyMapping(
        "pvt_v2", "PVT v2",
        markers={"official": (r"^patch_embed1\.proj\.weight$", r"^block1\.0\.mlp\.dwconv\.dwconv\.weight$"),
                 "timm": (r"^patch_embed\.proj\.weight$", r"^stages\.0\.blocks\.0\.mlp\.dwconv\.weight$")},
        converters={"official": pvt_v2_from_official, "timm": _dropping("head.")},
        hparams=pvt_v2_hparams, hparams_of_kwargs=pvt_v2_hparams_of_kwargs),
    FamilyMapping(
        "twins", "Twins",
        markers={"official": (r"^patch_embeds\.0\.proj\.weight$", r"^pos_block\.0\.proj\.0\.weight$")},
        converters={"official": twins_from_official, "timm": twins_from_official},
        hparams=twins_hparams, hparams_of_kwargs=twins_hparams_of_kwargs,
        # the per-stage LayerNorms of SVT's detection design are not in ImageNet classifiers
        new_prefixes=("norm_list.",)),
    FamilyMapping(
        "levit", "LeViT",
        markers={"official": (r"^patch_embed\.0\.c\.weight$", r"^blocks\.0\.m\.qkv\.c\.weight$"),
                 "timm": (r"^stem\.conv1\.linear\.weight$", r"^stages\.0\.blocks\.0\.attn\.attention_biases$")},
        converters={"official": levit_from_official, "timm": levit_from_timm},
        hparams=levit_hparams, hparams_of_kwargs=levit_hparams_of_kwargs),
    FamilyMapping(
        "gcvit", "GC ViT",
        markers={"official": (r"^patch_embed\.conv_down\.reduction\.weight$",
                              r"^levels\.0\.blocks\.0\.attn\.qkv\.weight$"),
                 "timm": (r"^stem\.down\.conv_block\.conv_dw\.weight$",
                          r"^stages\.0\.blocks\.0\.attn\.rel_pos\.relative_position_bias_table$")},
        converters={"official": gcvit_from_official, "timm": gcvit_from_timm},
        hparams=gcvit_hparams, hparams_of_kwargs=gcvit_hparams_of_kwargs),
    FamilyMapping(
        "vip", "Vision Permutator",
        markers={"official": (r"^patch_embed\.proj\.weight$", r"^network\.0\.0\.attn\.mlp_h\.weight$")},
        converters={"official": vip_from_official},
        hparams=vip_hparams, hparams_of_kwargs=vip_hparams_of_kwargs),
]}


def get_mapping(family: str) -> FamilyMapping:
    """The :class:`FamilyMapping` of ``family``; unknown names list the supported ones."""
    try:
        return MAPPINGS[family]
    except KeyError:
        raise KeyError(f"no checkpoint mapping for family '{family}'; supported: {', '.join(MAPPINGS)}") from None

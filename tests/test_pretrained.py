"""Tests of ImageNet checkpoint conversion and loading (pvt_d2/checkpoint, tools/convert_pretrained.py).

No checkpoint can be downloaded here, so every file is written by the tests in
its source's own layout:

* timm layout: a random timm classifier (tables, layer scales and batch-norm
  statistics re-drawn so that they matter) saved with ``torch.save`` and as
  safetensors; after loading, our backbone must reproduce timm's features.
* official layout: a pvt_d2 state dict renamed to the official repository's
  names by inverse mappings written here, independently of the library
  (``*_to_official`` below, from the official model definitions), plus the
  classifier entries and index buffers those files carry; the conversion must
  give back the pvt_d2 state dict key by key.
"""
import argparse
import copy
import os
import pickle
import re

import pytest
import timm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_backbone, build_model
from safetensors.torch import save_file
from torch import nn

from pvt_d2.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    convert_state_dict,
    load_pretrained_backbone,
    read_state_dict,
    save_for_detectron2,
)
from pvt_d2.config import load_config
from pvt_d2.checkpoint.convert import arch_hparams, describe_backbone, match_arch, new_parameter_prefixes
from pvt_d2.modeling import create_backbone, get_arch, list_architectures
from pvt_d2.modeling.backbone.gcvit import FIRST_GENERATION_QUERIES_KEY
from pvt_d2.cli.convert_pretrained import main as convert_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Keys an ImageNet file may carry that no backbone has (classifier, distillation head, index buffers).
DROPPABLE = r"^(head|head_dist|norm)\.|^cls_token$|(attention_bias_idxs|relative_position_index)$"
X224 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every tensor whose init is not already random away from it.

    Learned tables and layer scales are re-drawn at a visible scale, batch-norm
    statistics and scales made non-trivial, and every vector (norm weights and
    biases, linear biases) perturbed, so that two swapped norms or biases
    cannot go unnoticed. Weight matrices and kernels keep their random init.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if "bias_table" in name or "attention_biases" in name:
                t.copy_(torch.randn(t.shape, generator=g))
            elif name.endswith("gamma"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() <= 1:
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return model


def _assert_same_state(actual: dict, expected: dict) -> None:
    """Same keys and bit-identical tensors, checked key by key."""
    assert sorted(actual) == sorted(expected)
    for k in expected:
        assert actual[k].shape == expected[k].shape, k
        assert torch.equal(actual[k], expected[k]), k


def _scramble_(model: nn.Module) -> nn.Module:
    """Overwrite every floating tensor of ``model`` in place, to prove a later load writes them all."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.fill_(0.123)
    return model


_MODEL_CACHE = {}


def _materialize(model: nn.Module, seed: int = 2) -> nn.Module:
    """Give a meta-device model (without buffers) CPU weights: N(0, 0.02) matrices, unit norm scales, zero biases."""
    assert not list(model.buffers())
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return model


def _meta_backbone(arch: str, **overrides):
    """The backbone built on the meta device (shapes only, instant), or None where construction needs data."""
    try:
        with torch.device("meta"):
            return create_backbone(arch, **overrides)
    except NotImplementedError:  # e.g. drop-path rates read back with .tolist()
        return None


def _model(arch: str, fresh: bool = True, **overrides) -> nn.Module:
    """A randomized pvt_d2 backbone, built once per arch and overrides; a copy unless ``fresh=False``.

    The weight init of the large variants is slow on CPU; a model without
    buffers is therefore built on the meta device and filled with random
    values instead (every test here overwrites or only compares them).
    """
    key = (arch, tuple(sorted(overrides.items())))
    if key not in _MODEL_CACHE:
        torch.manual_seed(2)
        model = _meta_backbone(arch, **overrides)
        if model is not None and not list(model.buffers()):
            model = _materialize(model)
        else:
            model = create_backbone(arch, **overrides)
        _MODEL_CACHE[key] = _randomize(model.eval())
    return copy.deepcopy(_MODEL_CACHE[key]) if fresh else _MODEL_CACHE[key]


def _levit_reference(t: nn.Module, x: torch.Tensor) -> dict:
    s = t.stem
    res2 = s.act2(s.conv2(s.act1(s.conv1(x))))
    res3 = s.act3(s.conv3(res2))
    res4, res5, _ = t.forward_intermediates(x, intermediates_only=True)
    return {"res2": res2, "res3": res3, "res4": res4, "res5": res5}


def _timm_reference(name: str, t: nn.Module, x: torch.Tensor) -> dict:
    with torch.no_grad():
        if name.startswith("levit"):
            return _levit_reference(t, x)
        return dict(zip(("res2", "res3", "res4", "res5"), t.forward_intermediates(x, intermediates_only=True)))


#: timm families: (timm model name, our constructor overrides for an exact comparison).
TIMM_CASES = {
    "pvt_v2_b0": {},
    "twins_svt_small": {"extra_norm": False},  # timm has no per-stage detection norm
    "levit_128s": {},
    "gcvit_xxtiny": {},
}
_TIMM_CACHE = {}


def _timm_source(name: str):
    """(state dict in timm's layout, timm's features at 224) for a randomized timm classifier, cached."""
    if name not in _TIMM_CACHE:
        t = timm.create_model(name, device="meta")
        if list(t.buffers()):  # index buffers are computed at construction: build for real
            torch.manual_seed(0)
            t = timm.create_model(name)
        else:
            t = _materialize(t, seed=0)
        t = _randomize(t.eval())
        _TIMM_CACHE[name] = (t.state_dict(), _timm_reference(name, t, X224))
    return _TIMM_CACHE[name]


# ---------------------------------------------------------------------------
# (1) timm layout: zero missing / unexpected keys and timm's features
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_checkpoint_loads_and_reproduces_timm_features(name, tmp_path):
    """Saved with torch.save (nested the way timm's train script does) and as safetensors."""
    state, ref = _timm_source(name)
    pth = str(tmp_path / f"{name}.pth.tar")
    torch.save({"state_dict": state, "epoch": 3, "args": argparse.Namespace(model=name, lr=1e-3)}, pth)
    safetensors = str(tmp_path / f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, safetensors)

    model = _scramble_(_model(name, **TIMM_CASES[name]))
    report = load_pretrained_backbone(model, pth)
    assert report.ok and report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.new == []
    # only classifier-only keys were dropped
    assert report.dropped and all(re.search(DROPPABLE, k) for k in report.dropped), report.dropped
    assert len(report.loaded) + len(report.dropped) == len(state)
    with torch.no_grad():
        out = model(X224)
    for level, expected in ref.items():
        err = (out[level] - expected).abs().max().item()
        assert err < 1e-4, (name, level, err)
        assert expected.abs().max() > 0.1

    # the safetensors copy converts to the same tensors and loads completely as well
    from_safetensors = convert_checkpoint(safetensors, arch=name)
    _assert_same_state(from_safetensors.state_dict, model.state_dict())
    report = load_pretrained_backbone(model, safetensors)
    assert report.ok and report.new == [] and len(report.loaded) == len(model.state_dict())


def test_twins_svt_detection_norms_are_reported_as_new():
    """SVT's default detection design adds per-stage LayerNorms that no ImageNet file has: new, not missing."""
    state, _ = _timm_source("twins_svt_small")
    model = _model("twins_svt_small", fresh=False)  # extra_norm on (this cached model has no other user)
    converted = convert_state_dict(state, source="twins_svt_small (timm)")
    from pvt_d2.checkpoint import load_converted

    report = load_converted(model, converted)
    assert report.ok
    assert sorted(report.new) == sorted(f"norm_list.{i}.{p}" for i in range(4) for p in ("weight", "bias"))


def test_timm_levit_conv_checkpoint_loads_into_linear_levit(tmp_path):
    """timm's ``levit_conv_*`` stores the projections as 1x1 convs; they load into our Linear layers."""
    torch.manual_seed(1)
    t = _randomize(timm.create_model("levit_conv_128s").eval())
    path = str(tmp_path / "levit_conv_128s.pth")
    torch.save(t.state_dict(), path)
    model = create_backbone("levit_128s").eval()
    report = load_pretrained_backbone(model, path)
    assert report.ok and report.new == []
    with torch.no_grad():
        ref = _levit_reference(t, X224)
        out = model(X224)
    for level in ref:
        assert (out[level] - ref[level]).abs().max() < 1e-4, level


# ---------------------------------------------------------------------------
# (2) official layouts, written by independent inverse mappings
# ---------------------------------------------------------------------------
def pvt_to_official(native: dict) -> dict:
    """pvt_d2 PVT v1 -> whai362/PVT classification/pvt.py names."""
    out = {}
    for k, v in native.items():
        stage, rest = re.fullmatch(r"stages\.(\d)\.(.+)", k).groups()
        n = int(stage) + 1
        if rest == "pos_embed.weight":
            out[f"pos_embed{n}"] = v
        elif rest.startswith("patch_embed."):
            out[f"patch_embed{n}." + rest[len("patch_embed."):]] = v
        else:
            out[f"block{n}." + rest[len("blocks."):]] = v
    return out


def pvt_v2_to_official(native: dict) -> dict:
    """pvt_d2 / timm PVT v2 -> whai362/PVT classification/pvt_v2.py names."""
    out = {}
    for k, v in native.items():
        if k.startswith("patch_embed."):
            out["patch_embed1." + k[len("patch_embed."):]] = v
            continue
        stage, part, rest = re.fullmatch(r"stages\.(\d)\.(downsample|blocks|norm)\.(.+)", k).groups()
        n = int(stage) + 1
        if part == "downsample":
            out[f"patch_embed{n}.{rest}"] = v
        elif part == "norm":
            out[f"norm{n}.{rest}"] = v
        else:
            out[f"block{n}.{rest.replace('mlp.dwconv.', 'mlp.dwconv.dwconv.')}"] = v
    return out


def levit_to_official(native: dict, depths) -> dict:
    """pvt_d2 / timm LeViT -> facebookresearch/LeViT levit.py names (flat ``blocks`` sequence)."""
    # flat index of every attention residual, MLP residual and shrink attention
    index, position = {}, 0
    for stage, depth in enumerate(depths):
        if stage > 0:
            index[f"stages.{stage}.downsample.attn_downsample."] = (position, "shrink")
            index[f"stages.{stage}.downsample.mlp."] = (position + 1, "mlp")
            position += 2
        for j in range(depth):
            index[f"stages.{stage}.blocks.{j}.attn."] = (position, "attn")
            index[f"stages.{stage}.blocks.{j}.mlp."] = (position + 1, "mlp")
            position += 2
    renames = {
        "attn": [("qkv.linear.", "m.qkv.c."), ("qkv.bn.", "m.qkv.bn."), ("proj.ln.linear.", "m.proj.1.c."),
                 ("proj.ln.bn.", "m.proj.1.bn."), ("attention_biases", "m.attention_biases")],
        "shrink": [("kv.linear.", "kv.c."), ("kv.bn.", "kv.bn."), ("q.ln.linear.", "q.1.c."), ("q.ln.bn.", "q.1.bn."),
                   ("proj.ln.linear.", "proj.1.c."), ("proj.ln.bn.", "proj.1.bn."),
                   ("attention_biases", "attention_biases")],
        "mlp": [("ln1.linear.", "m.0.c."), ("ln1.bn.", "m.0.bn."), ("ln2.linear.", "m.2.c."), ("ln2.bn.", "m.2.bn.")],
    }
    out = {}
    for k, v in native.items():
        m = re.fullmatch(r"stem\.conv(\d)\.(linear|bn)\.(.+)", k)
        if m:
            out[f"patch_embed.{2 * (int(m.group(1)) - 1)}.{'c' if m.group(2) == 'linear' else 'bn'}.{m.group(3)}"] = v
            continue
        prefix = next(p for p in index if k.startswith(p))
        position, role = index[prefix]
        rest = k[len(prefix):]
        old, new = next((o, n) for o, n in renames[role] if rest.startswith(o))
        out[f"blocks.{position}.{new}{rest[len(old):]}"] = v
        if rest == "attention_biases":  # the official code keeps the index as a persistent buffer
            suffix = "m.attention_bias_idxs" if role == "attn" else "attention_bias_idxs"
            out[f"blocks.{position}.{suffix}"] = torch.zeros(1, 1, dtype=torch.long)
    return out


def gcvit_to_official(native: dict, generation: str) -> dict:
    """pvt_d2 / timm GC ViT -> NVlabs/GCViT models/gc_vit.py names (either query-generator generation)."""
    mbconv = [("conv_dw.", "conv.0."), ("se.fc1.", "conv.2.fc.0."), ("se.fc2.", "conv.2.fc.2."),
              ("conv_pw.", "conv.3.")]
    qgen = "q_global_gen.to_q_global" if generation == "q_global_gen" else "to_q_global"

    def mb(rest):  # a Fused-MBConv / downsampler parameter, under its official name
        if rest.startswith("conv_block."):
            rest = rest[len("conv_block."):]
        elif not rest.startswith(("conv_dw.", "se.", "conv_pw.")):
            return rest  # norm1, norm2, reduction
        return next(n + rest[len(o):] for o, n in mbconv if rest.startswith(o))

    out = {}
    for k, v in native.items():
        if re.search(r"se\.fc[12]\.weight$", k):
            v = v[:, :, 0, 0]  # official SE layers are Linear
        if k.startswith("stem.conv1."):
            out["patch_embed.proj." + k[len("stem.conv1."):]] = v
        elif k.startswith("stem.down."):
            out["patch_embed.conv_down." + mb(k[len("stem.down."):])] = v
        elif k.startswith("stages.3.norm."):
            out["norm." + k[len("stages.3.norm."):]] = v
        else:
            stage, part, rest = re.fullmatch(r"stages\.(\d)\.(downsample|global_block|blocks)\.(.+)", k).groups()
            stage = int(stage)
            if part == "downsample":  # officially the end of the previous level
                out[f"levels.{stage - 1}.downsample.{mb(rest)}"] = v
            elif part == "global_block":
                conv, sub = re.fullmatch(r"blocks\.conv(\d)\.(.+)", rest).groups()
                out[f"levels.{stage}.{qgen}.{int(conv) - 1}.{mb(sub)}"] = v
            else:
                block, sub = re.fullmatch(r"(\d+)\.(.+)", rest).groups()
                sub = {"ls1.gamma": "gamma1", "ls2.gamma": "gamma2"}.get(sub, sub)
                sub = sub.replace("attn.rel_pos.", "attn.")
                out[f"levels.{stage}.blocks.{block}.{sub}"] = v
                if sub == "attn.relative_position_bias_table":
                    out[f"levels.{stage}.blocks.{block}.attn.relative_position_index"] = torch.zeros(
                        1, dtype=torch.long)
    return out


def _classifier_extras(dim: int, *names: str) -> dict:
    g = torch.Generator().manual_seed(5)
    shapes = {"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (1000, dim), "head.bias": (1000,),
              "cls_token": (1, 1, dim)}
    return {n: torch.randn(shapes[n], generator=g) for n in names}


def _levit_heads(dim: int) -> dict:
    out = {}
    for head in ("head", "head_dist"):
        out.update({f"{head}.bn.weight": torch.ones(dim), f"{head}.bn.bias": torch.zeros(dim),
                    f"{head}.bn.running_mean": torch.zeros(dim), f"{head}.bn.running_var": torch.ones(dim),
                    f"{head}.bn.num_batches_tracked": torch.tensor(0), f"{head}.l.weight": torch.randn(1000, dim),
                    f"{head}.l.bias": torch.zeros(1000)})
    return out


#: name -> (arch, constructor overrides, official-layout builder, file name, how the file nests the weights)
OFFICIAL_CASES = {
    "pvt_tiny": ("pvt_tiny", {}, lambda sd: {**pvt_to_official(sd),
                                             **_classifier_extras(512, "norm.weight", "norm.bias", "cls_token",
                                                                  "head.weight", "head.bias")},
                 "pvt_tiny.pth", "model"),
    "pvt_v2_b0": ("pvt_v2_b0", {}, lambda sd: {**pvt_v2_to_official(sd),
                                               **_classifier_extras(256, "head.weight", "head.bias")},
                  "pvt_v2_b0.pth", None),
    "twins_svt_small": ("twins_svt_small", {"extra_norm": False},
                        lambda sd: {**sd, **_classifier_extras(512, "norm.weight", "norm.bias", "head.weight",
                                                               "head.bias")},
                        "alt_gvt_small.pth", None),
    "levit_128s": ("levit_128s", {}, lambda sd: {**levit_to_official(sd, (2, 3, 4)), **_levit_heads(384)},
                   "LeViT-128S.pth", "model"),
    "gcvit_xxtiny": ("gcvit_xxtiny", {}, lambda sd: {**gcvit_to_official(sd, "q_global_gen"),
                                                     **_classifier_extras(512, "head.weight", "head.bias")},
                     "gcvit_1k_xxtiny.pth.tar", "state_dict"),
    # the earlier official generation (to_q_global directly under the level), with layer scale (gamma1/2)
    "gcvit_xxtiny_ls": ("gcvit_xxtiny", {"layer_scale": 1e-5},
                        lambda sd: {**gcvit_to_official(sd, "to_q_global"),
                                    **_classifier_extras(512, "head.weight", "head.bias")},
                        "gcvit_old.pth.tar", "state_dict"),
    # ViP-M/7's layout (downsampling after stage 1) at one block per stage: the full variants are 25M+
    # parameters, slow to copy around here; their identification is checked on the meta device below
    "vip_m7_shallow": ("vip_m7", {"layers": (1, 1, 1, 1)},
                       lambda sd: {**sd, **_classifier_extras(512, "norm.weight", "norm.bias", "head.weight",
                                                              "head.bias")},
                       "vip_m7.pth.tar", "state_dict_ema"),
}


@pytest.mark.parametrize("case", list(OFFICIAL_CASES))
def test_official_checkpoint_converts_key_by_key_and_loads(case, tmp_path):
    arch, overrides, to_official, filename, nesting = OFFICIAL_CASES[case]
    source = _model(arch, fresh=False, **overrides)  # read only
    native = source.state_dict()
    # the backbone's own modules that no ImageNet checkpoint has (detection necks and norms)
    ours_only = tuple(p for p in new_parameter_prefixes(get_arch(arch).family) if any(k.startswith(p) for k in native))
    official = to_official({k: v for k, v in native.items() if not k.startswith(ours_only)})
    path = str(tmp_path / filename)
    torch.save(official if nesting is None else {nesting: official, "epoch": 300}, path)

    converted = convert_checkpoint(path)
    assert converted.family == get_arch(arch).family
    assert converted.layout == "official"
    _, source_arch, source_hparams = describe_backbone(source)
    assert (converted.arch, converted.hparams) == (source_arch, source_hparams)
    if not overrides or case == "twins_svt_small":  # extra_norm does not change the variant; the others do
        assert converted.arch == arch
    else:
        assert converted.arch is None
    expected = {k: v for k, v in native.items() if not k.startswith(ours_only)}
    first_generation = case == "gcvit_xxtiny_ls"  # its weights carry the query-layout entry (test_gcvit_first_...)
    if first_generation:
        expected[FIRST_GENERATION_QUERIES_KEY] = torch.tensor(1)
    _assert_same_state(converted.state_dict, expected)
    # exactly the classifier entries and index buffers were dropped, nothing else
    assert len(converted.dropped) == len(official) - len(expected) + first_generation
    assert all(re.search(DROPPABLE, k) for k in converted.dropped), converted.dropped

    target = _scramble_(copy.deepcopy(source))
    report = load_pretrained_backbone(target, path)
    assert report.ok and report.missing == [] and report.unexpected == []
    assert all(k.startswith(ours_only) for k in report.new) and (bool(report.new) == bool(ours_only))
    loaded = target.state_dict()
    for k in expected:
        assert torch.equal(loaded[k], expected[k]), k
    assert getattr(target, "first_generation_queries", False) == first_generation


def test_official_dropped_keys_are_exactly_the_classifier_and_index_buffers(tmp_path):
    torch.manual_seed(3)
    levit = create_backbone("levit_128s")
    official = {**levit_to_official(levit.state_dict(), (2, 3, 4)), **_levit_heads(384)}
    converted = convert_state_dict(official, source="LeViT official")
    assert all(k.startswith(("head.", "head_dist.")) or k.endswith("attention_bias_idxs")
               for k in converted.dropped)
    assert sum(k.endswith("attention_bias_idxs") for k in converted.dropped) == 9 + 2  # 9 blocks, 2 shrinks
    pvt = _model("pvt_tiny", fresh=False)
    official = {**pvt_to_official(pvt.state_dict()),
                **_classifier_extras(512, "norm.weight", "norm.bias", "cls_token", "head.weight", "head.bias")}
    converted = convert_state_dict(official)
    assert sorted(converted.dropped) == ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    # the 224 px position tables keep their ImageNet shape (stage 4: 49 positions + the class slot)
    assert converted.state_dict["stages.3.pos_embed.weight"].shape == (1, 50, 512)
    assert converted.state_dict["stages.0.pos_embed.weight"].shape == (1, 3136, 64)


def test_convert_tool_flags_and_nested_key(tmp_path):
    """--arch / --layout force detection; --key picks e.g. the EMA weights."""
    torch.manual_seed(4)
    model = create_backbone("levit_128s")
    official = levit_to_official(model.state_dict(), (2, 3, 4))
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in official.items()}
    path = str(tmp_path / "levit.pth")
    torch.save({"model": official, "model_ema": ema}, path)
    out = str(tmp_path / "levit_d2.pth")
    assert convert_main([path, out, "--arch", "levit_128s", "--layout", "official", "--key", "model_ema"]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["__author__"] == "pvt_d2" and saved["matching_heuristics"] is True
    assert saved["pvt_d2"]["arch"] == "levit_128s" and saved["pvt_d2"]["source_layout"] == "official"
    native = model.state_dict()
    k = "stages.1.blocks.0.attn.attention_biases"
    assert torch.equal(saved["model"][k], native[k] + 1)
    # forcing the wrong layout is refused: the keys do not map
    assert convert_main([path, str(tmp_path / "bad.pth"), "--layout", "timm"]) == 2
    assert not os.path.exists(tmp_path / "bad.pth")


def test_every_registered_variant_is_identified_from_its_shapes():
    """The variant numbers of each registry entry are unique and read back from the model's own state dict."""
    signatures = {}
    for arch in list_architectures():
        hp = arch_hparams(arch)
        assert match_arch(get_arch(arch).family, hp) == arch
        signatures.setdefault((get_arch(arch).family, repr(hp)), []).append(arch)
    assert all(len(v) == 1 for v in signatures.values()), signatures
    # from the shapes (meta tensors are enough): every family whose construction allows it, plus
    # the small PVT v1 / v2 variants on the CPU
    checked = []
    for arch in list_architectures():
        model = _meta_backbone(arch)
        if model is None and arch in ("pvt_tiny", "pvt_v2_b0", "pvt_v2_b1"):
            model = _model(arch, fresh=False)
        if model is None and get_arch(arch).family == "levit":  # tiny, builds in milliseconds
            model = create_backbone(arch)
        if model is None:
            continue
        family, found, _ = describe_backbone(model)
        assert (family, found) == (get_arch(arch).family, arch)
        checked.append(arch)
    assert {get_arch(a).family for a in checked} == {"pvt", "pvt_v2", "twins", "levit", "gcvit", "vip"}
    assert len(checked) >= 22


# ---------------------------------------------------------------------------
# (3) refusals
# ---------------------------------------------------------------------------
def test_wrong_family_is_refused_naming_both(tmp_path):
    state, _ = _timm_source("levit_128s")
    path = str(tmp_path / "levit.pth")
    torch.save(state, path)
    model = _model("pvt_v2_b0", fresh=False)  # refusals leave it untouched (checked)
    with pytest.raises(CheckpointError) as e:
        load_pretrained_backbone(model, path)
    msg = str(e.value)
    assert "checkpoint is levit_128s" in msg and "model is pvt_v2_b0" in msg and path in msg
    # the tool refuses the same with --arch
    assert convert_main([path, str(tmp_path / "out.pth"), "--arch", "pvt_v2_b0"]) == 2
    assert not os.path.exists(tmp_path / "out.pth")


def test_wrong_variant_is_refused_naming_both(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "b1.pth")
    torch.save(_model("pvt_v2_b1", fresh=False).state_dict(), path)
    model = _model("pvt_v2_b0", fresh=False)  # refusals leave it untouched (checked)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_pretrained_backbone(model, path)
    msg = str(e.value)
    assert "checkpoint is pvt_v2_b1" in msg and "but the model is pvt_v2_b0" in msg
    assert "embed_dims=(64, 128, 320, 512)" in msg and "embed_dims=(32, 64, 160, 256)" in msg
    _assert_same_state(model.state_dict(), before)  # nothing was loaded
    # same shapes except the attention reduction: linear (li) vs regular SRA
    path = str(tmp_path / "b0_li.pth")
    torch.save(pvt_v2_to_official(create_backbone("pvt_v2_b0", linear=True).state_dict()), path)
    with pytest.raises(CheckpointError, match=r"checkpoint is an unregistered pvt_v2 variant \(detected from "
                                              r"linear=True\) but the model is pvt_v2_b0 \(linear=False\)"):
        convert_checkpoint(path, arch="pvt_v2_b0")


def test_partial_or_mismatched_load_is_refused_with_a_table(tmp_path):
    model = _model("pvt_v2_b0", fresh=False)  # refusals leave it untouched (checked)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "stages.2.blocks.1.attn.kv.weight"},
                    "MISSING", "missing from the checkpoint (1):\n  stages.2.blocks.1.attn.kv.weight"),
        "unexpected": ({**good, "stages.0.blocks.0.attn.extra": torch.zeros(3)}, "UNEXPECTED",
                       "unexpected in the checkpoint (1):\n  stages.0.blocks.0.attn.extra"),
        "shape": ({**good, "stages.1.blocks.0.attn.q.weight": torch.zeros(64, 65)}, "SHAPE MISMATCH",
                  "stages.1.blocks.0.attn.q.weight: checkpoint (64, 65) vs model (64, 64)"),
    }
    for name, (state, row, detail) in cases.items():
        path = str(tmp_path / f"{name}.pth")
        torch.save(state, path)
        with pytest.raises(CheckpointError) as e:
            load_pretrained_backbone(model, path)
        msg = str(e.value)
        assert "refusing a partial load into pvt_v2_b0" in msg and path in msg, name
        assert re.search(rf"\| {row}\s*\|\s*1 \|", msg), (name, msg)
        assert detail in msg, (name, msg)
        _assert_same_state(model.state_dict(), before)


def test_unreadable_files_are_refused_with_the_file_name(tmp_path):
    torch.manual_seed(0)
    state = create_backbone("levit_128s").state_dict()
    full = tmp_path / "full.pth"
    torch.save(state, str(full))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full_st = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(full_st))
    truncated_st = tmp_path / "truncated.safetensors"
    truncated_st.write_bytes(full_st.read_bytes()[:-100])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    no_tensors = tmp_path / "list.pth"
    torch.save([1, 2, 3], str(no_tensors))
    expected = {truncated: "truncated", truncated_st: "truncated", text: "not a checkpoint", empty: "empty",
                no_tensors: "not a state dict", tmp_path / "absent.pth": "not found"}
    model = create_backbone("levit_128s")
    for path, words in expected.items():
        with pytest.raises(CheckpointError) as e:
            load_pretrained_backbone(model, str(path))
        assert str(path) in str(e.value) and words in str(e.value), str(e.value)


class _Exploit:
    """Pickles as a call to ``os.system`` that would create a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_executing_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    zip_file = tmp_path / "evil.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}, "extra": _Exploit(marker)}, str(zip_file))
    legacy = tmp_path / "evil_legacy.pth"
    torch.save({"model": _Exploit(marker)}, str(legacy), _use_new_zipfile_serialization=False)
    raw2 = tmp_path / "evil_p2.pkl"
    with open(raw2, "wb") as f:
        pickle.dump({"state_dict": _Exploit(marker)}, f, protocol=2)
    raw5 = tmp_path / "evil_p5.pkl"
    with open(raw5, "wb") as f:
        pickle.dump({"state_dict": _Exploit(marker)}, f, protocol=5)
    model = _model("pvt_v2_b0", fresh=False)  # refusals leave it untouched (checked)
    runs_code = f"would import or run Python code ({os.system.__module__}.system)"
    expected = {zip_file: runs_code, legacy: runs_code, raw2: runs_code,
                raw5: "content the safe loader does not rebuild"}
    for path, reason in expected.items():
        with pytest.raises(CheckpointError) as e:
            load_pretrained_backbone(model, str(path))
        msg = str(e.value)
        assert msg.startswith(f"Refusing to load {path}: ") and reason in msg, msg
        with pytest.raises(CheckpointError, match="Refusing to load"):
            read_state_dict(str(path))
        assert convert_main([str(path), str(tmp_path / "out.pth")]) == 2
        assert not os.path.exists(tmp_path / "out.pth")
    assert not marker.exists()


# ---------------------------------------------------------------------------
# (4) end to end: MODEL.PVT_D2.PRETRAINED and MODEL.WEIGHTS in real detectors
# ---------------------------------------------------------------------------
def _cfg(*opts):
    cfg = load_config(os.path.join(REPO, "configs", "mask_rcnn_pvt_v2_b0.yaml"),
                      ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
                       "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.PVT_D2.PRETRAINED", "", *opts])
    return cfg


def test_detector_config_pretrained_and_converted_weights(tmp_path):
    from pvt_d2.engine import Trainer

    state, _ = _timm_source("pvt_v2_b0")
    timm_file = str(tmp_path / "pvt_v2_b0.in1k.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, timm_file)
    expected = {k: v for k, v in state.items() if not k.startswith("head.")}

    # MODEL.PVT_D2.PRETRAINED: loaded when the trainer builds the model
    model = Trainer.build_model(_cfg("MODEL.PVT_D2.PRETRAINED", timm_file))
    _assert_same_state(model.backbone.bottom_up.state_dict(), expected)

    # tools/convert_pretrained.py output as MODEL.WEIGHTS through DetectionCheckpointer
    converted = str(tmp_path / "pvt_v2_b0_d2.pth")
    assert convert_main([timm_file, converted]) == 0
    fpn_model = build_model(_cfg())
    fpn_before = {k: v.clone() for k, v in fpn_model.state_dict().items() if not k.startswith("backbone.bottom_up.")}
    DetectionCheckpointer(fpn_model).load(converted)
    _assert_same_state(fpn_model.backbone.bottom_up.state_dict(), expected)
    after = fpn_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fpn_before.items())  # nothing else was touched

    # the same file into a plain backbone (keys "backbone.*")
    cfg = _cfg("MODEL.BACKBONE.NAME", "build_pvt_d2_backbone")
    plain = nn.Module()
    plain.backbone = build_backbone(cfg)
    DetectionCheckpointer(plain).load(converted)
    _assert_same_state(plain.backbone.state_dict(), expected)

    # and the converted file is itself accepted by MODEL.PVT_D2.PRETRAINED
    plain2 = nn.Module()
    plain2.backbone = build_backbone(cfg)
    report = load_pretrained_backbone(plain2, converted)
    assert report.ok and report.dropped == []
    _assert_same_state(plain2.backbone.state_dict(), expected)


# ---------------------------------------------------------------------------
# (5) GC ViT weights of the first official generation (levels.{i}.to_q_global)
# ---------------------------------------------------------------------------
def _first_generation_gcvit(sd: dict, x: torch.Tensor, num_heads, windows=(7, 7, 14, 7)) -> dict:
    """The first released NVlabs/GCVit ``models/gc_vit.py`` (commit a6bac2d), re-stated on its state dict.

    Functional and written from that file's structure, independently of
    pvt_d2: PatchEmbed (conv, ReduceSize), levels of alternating local /
    global window attention with a query generator ``to_q_global`` applied to
    the channels-last map ``.view``-ed as channels-first (quirk a), global
    queries reshaped into heads from the channels-first map (quirk b), and
    the ReduceSize downsampler closing each level but the last. Batch size 1
    (that code's ``repeat`` mixes images at larger batches). Returns the
    levels' outputs before their downsampler, and the final norm of the last,
    as ``res2``-``res5``.
    """
    import torch.nn.functional as F

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])

    def fused_mbconv(t, name):  # channels-first; Sequential(dw conv, GELU, SE, pw conv) as a residual
        y = F.gelu(F.conv2d(t, sd[f"{name}.0.weight"], padding=1, groups=t.shape[1]))
        s = torch.sigmoid(F.gelu(y.mean((2, 3)) @ sd[f"{name}.2.fc.0.weight"].t()) @ sd[f"{name}.2.fc.2.weight"].t())
        return t + F.conv2d(y * s[:, :, None, None], sd[f"{name}.3.weight"])

    def reduce_size(t, name):  # channels-last in and out
        t = fused_mbconv(ln(t, f"{name}.norm1").permute(0, 3, 1, 2), f"{name}.conv")
        return ln(F.conv2d(t, sd[f"{name}.reduction.weight"], stride=2, padding=1).permute(0, 2, 3, 1),
                  f"{name}.norm2")

    def bias(name, ws):
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
        return sd[f"{name}.relative_position_bias_table"][index.view(-1)].view(ws * ws, ws * ws, -1).permute(2, 0, 1)

    def attention(t, name, heads, ws, q_map):  # t: (windows, N, C); q_map: (1, C, ws, ws) or None
        nwin, n, c = t.shape
        hd = c // heads
        proj = t @ sd[f"{name}.qkv.weight"].t() + sd[f"{name}.qkv.bias"]
        if q_map is None:
            q, k, v = proj.reshape(nwin, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        else:
            k, v = proj.reshape(nwin, n, 2, heads, hd).permute(2, 0, 3, 1, 4)
            q = q_map.repeat(nwin, 1, 1, 1).reshape(nwin, heads, n, hd)  # quirk (b)
        a = torch.softmax((q * hd ** -0.5) @ k.transpose(-2, -1) + bias(name, ws)[None], dim=-1)
        return ((a @ v).transpose(1, 2).reshape(nwin, n, c) @ sd[f"{name}.proj.weight"].t()
                + sd[f"{name}.proj.bias"])

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=2, padding=1)
    x = reduce_size(x.permute(0, 2, 3, 1), "patch_embed.conv_down")
    out = {}
    for i, (heads, ws) in enumerate(zip(num_heads, windows)):
        lv = f"levels.{i}"
        _, h, w, c = x.shape
        q = x.reshape(1, c, h, w)  # quirk (a): the channels-last memory read as channels-first
        j = 0
        while f"{lv}.to_q_global.{j}.conv.0.weight" in sd:
            q = fused_mbconv(q, f"{lv}.to_q_global.{j}.conv")
            if q.shape[-1] != ws:  # FeatExtract(keep_dim=False) pools; the last one of a 14 window keeps
                q = F.max_pool2d(q, 3, 2, 1)
            j += 1
        blocks = sorted({int(k.split(".")[3]) for k in sd if k.startswith(f"{lv}.blocks.")})
        for b in blocks:
            name = f"{lv}.blocks.{b}"
            g1, g2 = sd.get(f"{name}.gamma1", 1.0), sd.get(f"{name}.gamma2", 1.0)
            t = ln(x, f"{name}.norm1").view(1, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
            t = attention(t.reshape(-1, ws * ws, c), f"{name}.attn", heads, ws, q if b % 2 else None)
            t = t.view(1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(1, h, w, c)
            x = x + g1 * t
            m = F.gelu(ln(x, f"{name}.norm2") @ sd[f"{name}.mlp.fc1.weight"].t() + sd[f"{name}.mlp.fc1.bias"])
            x = x + g2 * (m @ sd[f"{name}.mlp.fc2.weight"].t() + sd[f"{name}.mlp.fc2.bias"])
        if f"{lv}.downsample.reduction.weight" in sd:
            out[f"res{i + 2}"] = x.permute(0, 3, 1, 2)
            x = reduce_size(x, f"{lv}.downsample")
        else:
            out[f"res{i + 2}"] = ln(x, "norm").permute(0, 3, 1, 2)
    return out


@pytest.mark.parametrize("layer_scale", [None, pytest.param(1e-5, marks=pytest.mark.slow)])
def test_gcvit_first_generation_weights_reproduce_that_code(layer_scale, tmp_path):
    """The first official layout switches the model to that code's query layout; its features then match it."""
    source = _model("gcvit_xxtiny", fresh=False, **({"layer_scale": layer_scale} if layer_scale else {}))
    official = {**gcvit_to_official(source.state_dict(), "to_q_global"),
                **_classifier_extras(512, "head.weight", "head.bias")}
    path = str(tmp_path / "gcvit_xxtiny_first_generation.pth.tar")
    torch.save({"state_dict": official}, path)
    with torch.no_grad():
        reference = _first_generation_gcvit(official, X224, num_heads=(2, 4, 8, 16))

    model = _scramble_(copy.deepcopy(source))
    assert not model.first_generation_queries
    report = load_pretrained_backbone(model, path)
    assert report.ok and model.first_generation_queries
    assert FIRST_GENERATION_QUERIES_KEY in report.loaded
    with torch.no_grad():
        out = model(X224)
        model.first_generation_queries = False  # the same weights read the later way: other features
        later = model(X224)
        model.first_generation_queries = True
    for level, expected in reference.items():
        err = (out[level] - expected).abs().max().item()
        assert err < 1e-4 * max(1.0, expected.abs().max().item()), (level, err)
    # quirk (a) acts from res2 on, so every level differs when the layout is ignored
    assert all((later[lv] - reference[lv]).abs().max() > 1e-2 for lv in reference)

    # the mode travels with the weights: state dict, detectron2 checkpoint, and back to the later layout
    state = model.state_dict()
    assert state[FIRST_GENERATION_QUERIES_KEY].item() == 1
    fresh = copy.deepcopy(source)
    assert not fresh.first_generation_queries
    incompatible = fresh.load_state_dict(state, strict=True)
    assert fresh.first_generation_queries and not incompatible.missing_keys and not incompatible.unexpected_keys
    fresh.load_state_dict(source.state_dict())  # weights of the later layout switch it off again
    assert not fresh.first_generation_queries and FIRST_GENERATION_QUERIES_KEY not in fresh.state_dict()
    # ... and a timm / later-official file loaded into a first-generation model does as well
    later_file = str(tmp_path / "later.pth")
    torch.save(gcvit_to_official(source.state_dict(), "q_global_gen"), later_file)
    assert load_pretrained_backbone(model, later_file).ok and not model.first_generation_queries

    # MODEL.WEIGHTS files cannot carry the mode: the converter refuses to write one
    with pytest.raises(CheckpointError, match="first-generation GC ViT weights.*MODEL.PVT_D2.PRETRAINED"):
        save_for_detectron2(convert_checkpoint(path), str(tmp_path / "out_d2.pth"))
    assert not os.path.exists(tmp_path / "out_d2.pth")


def test_gcvit_first_generation_mode_survives_a_detector_checkpoint(tmp_path):
    """A detector fine-tuned from first-generation weights is evaluated with that layout after a reload."""
    from pvt_d2.checkpoint import AtomicCheckpointer

    cfg = load_config(os.path.join(REPO, "configs", "retinanet_gcvit_xxt.yaml"),
                      ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "OUTPUT_DIR", str(tmp_path),
                       "MODEL.PVT_D2.PRETRAINED", ""])
    trained = build_model(cfg)
    trained.backbone.bottom_up.first_generation_queries = True
    AtomicCheckpointer(trained, save_dir=str(tmp_path)).save("model_final")
    evaluated = build_model(cfg)
    assert not evaluated.backbone.bottom_up.first_generation_queries
    AtomicCheckpointer(evaluated, save_dir=str(tmp_path), strict=True).load(str(tmp_path / "model_final.pth"))
    assert evaluated.backbone.bottom_up.first_generation_queries

"""compressed-tensors checkpoints (the format of llm-compressor, loaded by transformers and vLLM).

Writing goes through the library's own classes: QuantizationArgs / QuantizationScheme /
QuantizationConfig describe the layers, the compressor the library picks for that scheme
(`infer_module_format`) packs each layer, and ModelCompressor writes `quantization_config`.
In compressed-tensors 0.20 that is "pack-quantized" for weight-only schemes (any width 1..8,
int32 words) and "int-quantized" (one int8 per weight, unpacked) once activations are
quantized too.

Conventions, theirs against ours (quant/grid.py):
- their integers are signed: q_ct = q - 2**(bits-1), and so is their zero point:
  zp_ct = zero - 2**(bits-1); Ŵ = scale * (q_ct - zp_ct) = scale * (q - zero).
- symmetric schemes store no zero point (ours is 2**(bits-1) there, i.e. zp_ct = 0).
- scales have shape (out, groups), (out, 1) per channel, in the model dtype: the loader
  creates them that way. For float32 models the dequantized weights are bit-identical to the
  fake-quant ones; for fp16/bf16 models they are iff the scales are representable in that dtype.
- FP4 grids (nvfp4, mxfp4) are written as llm-compressor writes NVFP4A16 / MXFP4A16:
  `weight_packed` (uint8, two E2M1 codes a byte, the even column low), `weight_scale` (E4M3,
  or E8M0 codes as uint8) and, for nvfp4, `weight_global_scale` (float32, shape [1]); formats
  nvfp4-pack-quantized / mxfp4-pack-quantized. The library's own decompression gives the
  fake-quant weights (in bfloat16, its unpacking dtype; bit for bit in float32 through its
  `dequantize`). vLLM fuses q/k/v and gate/up and keeps one global scale for them: the nvfp4
  grid gives them a shared one (grids/nvfp4.py: for_block; not run in vLLM).
- activations (input_activations of every scheme): integers with the uniform grid; FP4 ones as
  llm-compressor's W4A4 presets, NVFP4 with nvfp4 weights (each layer's static
  `input_global_scale`, float32 [1], stored as compressed-tensors keeps it: 448 * 6 / amax, the
  multiplier, as `weight_global_scale`) and MXFP4 with mxfp4 weights; FP8_DYNAMIC's per-token
  FP8 with any weights (W4A8). Other pairs have no preset: refused (`check_act_pair`).
- rotate's run-time rotation x -> x H before down_proj is the library's transform config: one
  `random-hadamard` scheme at location `input` per distinct H, its matrix stored as
  `<layer>.<scheme>_input.weight` = sqrt(n) H, since both compressed-tensors and vLLM apply
  x -> x W / sqrt(n) with the stored W (vLLM's `hadamard` type would ignore it and run its own
  Sylvester kernel, so that type is not used). The weights are stored already rotated (W H).
"""
from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from ..errors import CrossblockError
from ..quant import fp4
from ..quant.grid import QuantizedWeight, dequantize, num_groups
from ..quant.experts import expert_params, is_fused_experts
from .common import layer_shape, model_dtype, save_folder, warn_if_scales_round
from .formats import ACT_PRESETS, FORMATS, Format, act_args, check_act_scheme, check_groups, contents_of
from .schema import check_packed, check_stored, is_int, need

FMT = "compressed-tensors"
log = logging.getLogger(__name__)


@FORMATS.register(FMT)
class CompressedTensors(Format):
    bits = (2, 4, 8)
    packed = True
    online_transforms = True  # as its transform config (module docstring)
    quant_method = FMT
    mixed = "fused"  # vLLM runs q/k/v and gate/up as one matmul each: one scheme for them
    loading = """Packed integers in compressed-tensors' layout (`quantization_config` in config.json).

```bash
vllm serve {out}
```

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{out}")  # asymmetric grids: quantization_config=CompressedTensorsConfig(dequantize=True)
# nvfp4 / mxfp4 folders: from_pretrained("{out}", dtype=torch.bfloat16) (FP4 decompresses into bfloat16)
import crossblock
model = crossblock.load("{out}")  # dense, exactly the evaluated weights
```"""  # the model card's "Loading" section

    def stored_scale_dtype(self, save_dtype):
        return save_dtype

    def accepts_grid(self, grid, model):
        if grid.kind_name in fp4.GROUP:
            from ..quant.linear import is_conv1d
            if any(is_conv1d(m) for m in model.modules()):
                raise CrossblockError("compressed-tensors export cannot store Conv1D layers (GPT-2 style): "
                                      "its transformers loader only handles nn.Linear; use fake")
            return
        super().accepts_grid(grid, model)

    def accepts(self, bits, group_size, sym, in_features, out_features, has_conv1d, act_scheme, fused_experts=()):
        check_groups(FMT, group_size, in_features)
        if fused_experts and not sym:
            raise CrossblockError(f"compressed-tensors export of fused MoE experts ({fused_experts[0]}) needs "
                                  "sym: true: transformers' loader decompresses fused experts without their zero "
                                  "points; quantize symmetrically or use fake")
        if has_conv1d:
            raise CrossblockError("compressed-tensors export cannot store Conv1D layers (GPT-2 style): "
                                  "its transformers loader only handles nn.Linear; use gptq or fake")
        check_act_pair("uniform", act_scheme)
        check_act_scheme(act_scheme)

    def accepts_activations(self, grid_kind, act_scheme):
        check_act_pair(grid_kind, act_scheme)
        check_act_scheme(act_scheme)

    def layers(self, model, modules):
        """The quantized linears, and each quantized fused-expert matrix under its checkpoint name."""
        modules = list(modules)
        return {**super().layers(model, modules), **{n: (None, qw) for n, qw in expert_layers(model, modules).items()}}

    def setting(self, qweight):
        return layer_scheme_key(qweight)

    def check_layers(self, layers, act_scheme):
        fp4_layers = {n: v for n, v in layers.items() if v[1].kind in fp4.GROUP}
        check_fp4_layers(fp4_layers, act_scheme)
        super().check_layers({n: v for n, v in layers.items() if n not in fp4_layers}, act_scheme)

    def tensors(self, model, modules, state, dtype, act_scheme):
        """`Format.tensors`, with each NVFP4-activation layer's calibrated `input_global_scale`."""
        from ..quant.act import Fp4ActQuant
        written = super().tensors(model, modules, state, dtype, act_scheme)
        for name, (module, _) in written.layers.items():
            q = getattr(module, "crossblock_act_quant", None)
            if isinstance(q, Fp4ActQuant) and q.kind == "nvfp4":
                written.packed[name][f"{name}.input_global_scale"] = q.glob.detach().float().reshape(1).cpu().clone()
        return written

    def layer_tensors(self, name, qweight, dtype, act_scheme):
        if qweight.kind in fp4.GROUP:
            return fp4_layer_tensors(qweight)
        return compress_layer(qweight, scheme(self.setting(qweight), act_scheme), dtype)

    def check_model(self, model, layers):
        super().check_model(model, layers)
        warn_if_scales_round(FMT, layers, model_dtype(model))
        warn_if_asymmetric(layers)

    def write(self, model, tokenizer, out_dir, act_scheme, grid=None):
        """`Format.write`, with the run-time rotations' matrices and transform config."""
        written = self.written(model, act_scheme)
        transforms, matrices = transform_config(model)
        save_folder(model, tokenizer, out_dir, {**written.state(), **matrices})
        self.write_config(out_dir, contents_of(model, self, written), act_scheme, transforms)

    def write_config(self, folder, contents, act_scheme, transforms=None):
        """One config group per setting: a single one targets "Linear" and ignores the
        full-precision linears (the usual llm-compressor shape); mixed precision targets each
        layer by its exact name. vLLM reads a MoE router as a Linear layer, so routers are ignored."""
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
        by_setting: dict[tuple, list[str]] = {}
        for name, setting in contents.settings.items():
            by_setting.setdefault(setting, []).append(name)
        single = len(by_setting) == 1
        schemes = {f"group_{i}": scheme(setting, act_scheme, None if single else names)
                   for i, (setting, names) in enumerate(sorted(by_setting.items()))}
        ignore = list(contents.full_precision) if single else []
        ignore += [n for n in contents.routers if n not in ignore]
        formats = {s.format for s in schemes.values()}
        config = QuantizationConfig(config_groups=schemes, ignore=ignore,
                                    format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                    quantization_status=QuantizationStatus.COMPRESSED)
        ModelCompressor(quantization_config=config, transform_config=transforms).update_config(str(folder))

    def read(self, quantization, tensors, layout):
        return read_compressed_tensors(layout, quantization, tensors)

    def activations(self, path, model):
        return config_activations(path, model)


def layer_scheme_key(qweight: QuantizedWeight) -> tuple:
    """(bits, group_size, sym) of a uniform layer; (kind,) of an FP4 one."""
    return (qweight.kind,) if qweight.kind in fp4.GROUP else (qweight.bits, qweight.group_size, qweight.sym)


def scheme_args(key: tuple):
    return fp4_args(key[0]) if key[0] in fp4.GROUP else weight_args(*key)


def fp4_args(kind: str):
    """llm-compressor's NVFP4A16 / MXFP4A16 weight arguments."""
    from compressed_tensors.quantization import QuantizationArgs
    if kind == "nvfp4":
        return QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", symmetric=True, dynamic=False,
                                group_size=16, scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn)
    return QuantizationArgs(num_bits=4, type="float", strategy="group", symmetric=True, dynamic=False,
                            group_size=32, scale_dtype=torch.uint8, zp_dtype=torch.uint8)


def fp4_layer_tensors(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """An FP4 layer's checkpoint tensors (module docstring) from its frozen record."""
    entries = {"weight_packed": fp4.pack_codes(qweight.q)}
    if qweight.kind == "mxfp4":
        entries["weight_scale"] = fp4.e8m0_codes(qweight.scale)
        return entries
    glob = qweight.zero.reshape(-1)[:1].float()
    if not bool((qweight.zero == glob).all()):
        raise CrossblockError(f"{FMT} export: an nvfp4 layer has more than one global scale; use fake")
    entries["weight_scale"] = qweight.scale.to(torch.float8_e4m3fn)
    entries["weight_global_scale"] = glob.clone()
    return entries


def check_act_pair(weight_kind: str, act_scheme: dict | None):
    """Weights and activations as a scheme compressed-tensors has (module docstring)."""
    if act_scheme is None:
        return
    act = act_scheme.get("type", "int")
    if act == "fp8" or act == weight_kind or (act == "int" and weight_kind == "uniform"):
        return
    if act == "int":
        raise CrossblockError(f"{FMT} export has no scheme of integer activations with {weight_kind} weights: "
                              f"use --act-type {weight_kind} (W4A4) or fp8 (W4A8), or format fake")
    raise CrossblockError(f"{FMT} export stores {act} activations with {act} weights only (llm-compressor's "
                          f"{ACT_PRESETS[act]}), not with {weight_kind} weights: use --grid {act}, or format fake")


def check_fp4_layers(layers: dict, act_scheme: dict | None):
    for kind in sorted({qw.kind for _, qw in layers.values()}):
        check_act_pair(kind, act_scheme)
    for name, (_, qw) in layers.items():
        group = fp4.GROUP[qw.kind]
        need(qw.q.shape[1] % group == 0, f"{FMT} layer {name}", f"input width {qw.q.shape[1]} is not a multiple of {group}")


def weight_args(bits: int, group_size: int, sym: bool):
    from compressed_tensors.quantization import QuantizationArgs
    if group_size == -1:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size)


def scheme(setting: tuple, act_scheme: dict | None, targets: list[str] | None = None):
    """The QuantizationScheme of layers of one setting ((bits, group_size, sym), or (fp4 kind,)), targeting
    `targets` by name (None: every "Linear"); its format is the compressor the library picks."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme
    result = QuantizationScheme(targets=targets or ["Linear"], weights=scheme_args(setting),
                                input_activations=act_args(act_scheme) if act_scheme else None)
    result.format = infer_module_format(nn.Linear, result).value
    return result


def compress_layer(qweight: QuantizedWeight, scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's checkpoint tensors, packed by the library's compressor.

    The compressor re-quantizes a float weight with the given scale and zero point; it gets
    scale * (q - zero) and the scale, both float32, so that rounding gives back q exactly.
    FP4 layers are packed here (fp4_layer_tensors): their codes are already what is stored."""
    from compressed_tensors.compressors import BaseCompressor
    if qweight.kind in fp4.GROUP:
        return fp4_layer_tensors(qweight)
    offset = 2 ** (qweight.bits - 1)
    scale = qweight.scale.to(dtype).float()  # what the loader will hold, widened for exact division
    entries = {"weight": dequantize(qweight.q, scale, qweight.zero, qweight.group_size), "weight_scale": scale}
    if not qweight.sym:
        entries["weight_zero_point"] = (qweight.zero - offset).to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    packed = compressor.compress(entries, scheme)
    packed["weight_scale"] = packed["weight_scale"].to(dtype)
    return packed


def warn_if_asymmetric(layers: dict):
    """Plain transformers (5.24, compressed-tensors 0.20) cannot load packed zero points
    (llm-compressor #1618, compressed-tensors #458): say so while the user can still choose."""
    asym = [name for name, (_, qw) in layers.items() if not qw.sym]
    if asym:
        log.warning("compressed-tensors with zero points (asymmetric grid, %d layers): plain transformers "
                    "`AutoModelForCausalLM.from_pretrained` fails on it (upstream llm-compressor #1618); load it "
                    "with quantization_config=CompressedTensorsConfig(dequantize=True), or quantize with --sym "
                    "(sym: true) for a folder that loads plainly", len(asym))

def fused_expert_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every fused 3-D expert parameter (E, out, in) of the model, by full name."""
    return {f"{n}.{p}": t for n, m in model.named_modules() if is_fused_experts(m)
            for p, t in expert_params(m).items()}


def expert_rows(model: nn.Module, fused: dict[str, torch.Size]) -> dict[str, tuple[str, torch.Tensor]]:
    """Checkpoint matrix name (e.g. `mlp.experts.3.gate_proj`: transformers saves, and vLLM and
    transformers' loader read, experts unfused) -> (fused parameter, its rows in the (E * out, in)
    view). Found by sending row numbers through transformers' own save-time conversion, so no
    family's layout is written down here."""
    from transformers.core_model_loading import revert_weight_conversion
    starts, total = {}, 0  # one running row number over all parameters: each row names its source
    for k, shape in fused.items():
        starts[k], total = total, total + shape[0] * shape[1]
    index = {k: torch.arange(starts[k], starts[k] + shape[0] * shape[1], dtype=torch.float64).reshape(*shape[:2], 1)
             for k, shape in fused.items()}
    mapping, seen = {}, dict.fromkeys(fused, 0)
    for key, rows in revert_weight_conversion(model, index).items():
        first = int(rows.flatten()[0]) if rows.numel() else -1
        source = next((k for k, s in fused.items() if 0 <= first - starts[k] < s[0] * s[1]), None)
        if source is None or not key.endswith(".weight") or rows.dim() != 2 or rows.shape[1] != 1:
            raise CrossblockError(f"{FMT} export cannot map the fused experts of this model to checkpoint "
                                  f"matrices ({key}); use fake")
        mapping[key.removesuffix(".weight")] = (source, rows[:, 0].long() - starts[source])
        seen[source] += rows.shape[0]
    missing = [k for k, s in fused.items() if seen[k] != s[0] * s[1]]
    if missing:
        raise CrossblockError(f"{FMT} export: checkpoint matrices do not cover every row of {missing[0]}; use fake")
    return mapping


def expert_layers(model: nn.Module, modules=None) -> dict[str, QuantizedWeight]:
    """Each quantized expert matrix as its own layer, under its checkpoint name; `modules`:
    the (full name, module) pairs to look in, default all of `model`'s (the low-memory path
    passes one block's, `model` being the skeleton whose conversion mapping names them)."""
    modules = model.named_modules() if modules is None else modules
    fused = {f"{name}.{param}": (getattr(module, param), qw) for name, module in modules
             for param, qw in (getattr(module, "crossblock_qexperts", None) or {}).items()}
    if not fused:
        return {}
    layers = {}
    for name, (source, r) in expert_rows(model, {k: p.shape for k, (p, _) in fused.items()}).items():
        qw = fused[source][1]
        layers[name] = QuantizedWeight(qw.q[r], qw.scale[r], qw.zero[r], qw.bits, qw.group_size, qw.sym, qw.kind)
    return layers


def fuse_expert_layers(layout: nn.Module, layers: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """The inverse of `expert_layers`: per-expert matrices read from a checkpoint -> one
    QuantizedWeight per fused parameter, over its (E * out, in) view."""
    fused = {k: p.shape for k, p in fused_expert_params(layout).items()}
    out = {}
    for name, (source, r) in expert_rows(layout, fused).items():
        qw, shape = layers.pop(name), fused[source]
        if source not in out:
            rows, groups = shape[0] * shape[1], qw.scale.shape[1]
            out[source] = QuantizedWeight(torch.zeros(rows, shape[2], dtype=torch.uint8), torch.zeros(rows, groups),
                                          torch.zeros(rows, groups), qw.bits, qw.group_size, qw.sym, qw.kind)
        out[source].q[r], out[source].scale[r], out[source].zero[r] = qw.q, qw.scale, qw.zero
    return out


def save_compressed_tensors(model: nn.Module, tokenizer, out_dir: str | os.PathLike, act_scheme: dict | None = None):
    """Write `model` as a compressed-tensors checkpoint.

    transformers loads it on CPU: symmetric schemes with plain
    `AutoModelForCausalLM.from_pretrained(out_dir)` (weights decompress on the first forward);
    asymmetric pack-quantized ones, with transformers 5.23 + compressed-tensors 0.20, only with
    `quantization_config=CompressedTensorsConfig(dequantize=True)`: the default path sizes the
    zero-point parameter unpacked, and the packed checkpoint tensor is refused as a mismatch."""
    CompressedTensors().write(model, tokenizer, out_dir, act_scheme)


def transform_config(model: nn.Module):
    """(TransformConfig or None, {checkpoint name: stored matrix}) for the model's run-time input
    rotations. Layers sharing one H share a scheme: the loaders keep one matrix per scheme and size."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
    from ..preprocess.online import record_transforms
    groups: dict[tuple, list[str]] = {}
    for name, spec in (record_transforms(model) or {"layers": {}})["layers"].items():
        groups.setdefault(tuple(spec.items()), []).append(name)
    if not groups:
        return None, {}
    log.warning("compressed-tensors with a run-time rotation (transform_config, %d layers): vLLM and "
                "crossblock.load apply it; plain transformers 5.24 ignores transform_config and would "
                "compute without it", sum(map(len, groups.values())))
    schemes, matrices = {}, {}
    for i, names in enumerate(groups.values()):
        key = "online" if i == 0 else f"online_{i}"
        schemes[key] = TransformScheme(type="random-hadamard", apply=[TransformArgs(targets=names, location="input")])
        h = model.get_submodule(names[0]).crossblock_input_transform.matrix()
        stored = (h * h.shape[0] ** 0.5).float().contiguous()
        matrices.update({f"{n}.{key}_input.weight": stored.clone() for n in names})
    return TransformConfig(config_groups=schemes), matrices


# -- reading ---------------------------------------------------------------------------------

def read_layer(tensors: dict, name: str, args, shape: tuple[int, int] | None = None) -> QuantizedWeight:
    """One layer's QuantizedWeight from its checkpoint tensors (removed from `tensors`), each
    checked against what the writer stores for a layer of `shape` (out, in; None: a per-expert
    matrix, whose shape the fused parameter checks later)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    bits, offset = args.num_bits, 2 ** (args.num_bits - 1)
    where = f"compressed-tensors layer {name}"
    if args.type == "float" and bits == 4 and args.group_size in (16, 32):
        return read_fp4_layer(tensors, name, args, shape)
    need(is_int(bits) and 1 <= bits <= 8, where, f"num_bits must be in 1..8, got {bits!r}")
    if args.strategy not in ("channel", "group") or args.type != "int":
        raise CrossblockError(f"{where}: crossblock reads int weights with channel "
                              f"or group strategy, not {args.type} / {args.strategy}")
    packed = f"{name}.weight" not in tensors  # pack-quantized; else int-quantized (one int8 per weight)
    if packed:
        check_stored("compressed-tensors", name, tensors, {"weight_shape": ((2,), "integer"), "weight_packed": (None, torch.int32)})
        stored = tuple(tensors[f"{name}.weight_shape"].tolist())
        if shape is not None:
            need(stored == tuple(shape), f"compressed-tensors tensor {name}.weight_shape",
                 f"{list(stored)}, but the layer's weight is {shape[0]}x{shape[1]}")
        shape = stored
    else:
        check_stored("compressed-tensors", name, tensors, {"weight": (shape, "integer")})
        shape = tuple(tensors[f"{name}.weight"].shape)
    groups = 1 if args.strategy == "channel" else num_groups(shape[1], args.group_size)
    packed_rows = -(-shape[0] // (32 // bits)) if packed else shape[0]  # zero points pack along out_features
    check_stored("compressed-tensors", name, tensors, {"weight_scale": ((shape[0], groups), "float"), **(
        {} if args.symmetric else {"weight_zero_point": ((packed_rows, groups), torch.int32 if packed else "integer")})},
        f" for the layer's {shape[0]}x{shape[1]} weight with {groups} group(s) per row")
    scale = tensors.pop(f"{name}.weight_scale").float()
    zero_point = tensors.pop(f"{name}.weight_zero_point", None)
    if packed:
        shape = tuple(tensors.pop(f"{name}.weight_shape").tolist())
        check_packed(name, tensors[f"{name}.weight_packed"], shape, bits)
        q_ct = unpack_from_int32(tensors.pop(f"{name}.weight_packed"), bits, shape)
        if zero_point is not None:
            zero_point = unpack_from_int32(zero_point, bits, (shape[0], scale.shape[1]), packed_dim=0)
    else:  # int-quantized: one int8 per weight
        q_ct = tensors.pop(f"{name}.weight")
        need(not q_ct.is_floating_point() and q_ct.numel() and -offset <= int(q_ct.min()) and int(q_ct.max()) < offset,
             f"compressed-tensors layer {name}", f"integers outside the {bits}-bit range")
    zero = torch.full_like(scale, offset) if zero_point is None else zero_point.float() + offset
    group_size = -1 if args.strategy == "channel" else args.group_size
    return QuantizedWeight((q_ct.to(torch.int16) + offset).to(torch.uint8), scale, zero,
                           bits, group_size, bool(args.symmetric))


def read_fp4_layer(tensors: dict, name: str, args, shape: tuple[int, int] | None) -> QuantizedWeight:
    """An nvfp4 / mxfp4 layer's record from weight_packed, weight_scale (and weight_global_scale)."""
    kind = "nvfp4" if args.group_size == 16 else "mxfp4"
    scale_dtype = torch.float8_e4m3fn if kind == "nvfp4" else torch.uint8
    check_stored(FMT, name, tensors, {"weight_packed": (None, torch.uint8)})
    rows, half = tensors[f"{name}.weight_packed"].shape
    if shape is not None:
        need((rows, 2 * half) == tuple(shape), f"{FMT} tensor {name}.weight_packed",
             f"{rows}x{half} bytes, but the layer's weight is {shape[0]}x{shape[1]}")
    groups = 2 * half // args.group_size
    check_stored(FMT, name, tensors, {"weight_scale": ((rows, groups), scale_dtype),
                                      **({"weight_global_scale": ((1,), torch.float32)} if kind == "nvfp4" else {})},
                 f" for the layer's {rows}x{2 * half} weight ({kind})")
    q = fp4.unpack_codes(tensors.pop(f"{name}.weight_packed"))
    stored = tensors.pop(f"{name}.weight_scale")
    if kind == "nvfp4":
        scale = stored.float()
        zero = tensors.pop(f"{name}.weight_global_scale").float().expand(rows, groups).clone()
    else:
        need(int(stored.max()) < 255 if stored.numel() else True, f"{FMT} tensor {name}.weight_scale",
             "E8M0 code 255 (NaN)")
        scale = 2.0 ** (stored.float() - 127)
        zero = torch.ones(rows, groups)
    return QuantizedWeight(q, scale, zero, 4, args.group_size, True, kind)


def act_kind(args) -> str | None:
    """Which of crossblock's activation quantizers compressed-tensors' input_activations `args`
    are: a float preset's (nvfp4, mxfp4, fp8), "int" (dynamic per token), or None (none here)."""
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    for kind, preset in ACT_PRESETS.items():
        if args.model_dump() == preset_name_to_scheme(preset, ["Linear"]).input_activations.model_dump():
            return kind
    if args.type == "int" and args.dynamic is True and args.strategy == "token" and 2 <= args.num_bits <= 8:
        return "int"
    return None


def config_activations(path, model: nn.Module) -> dict | None:
    """A compressed-tensors folder's activation quantizers from its config (and NVFP4's
    `input_global_scale` tensors), as act.record writes them: how crossblock.load runs a W4A4 /
    W8A8 folder written by llm-compressor as vLLM would."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules
    from ..quant.act import act_scheme
    from .common import read_config, read_tensors
    quantization = {k: v for k, v in read_config(path)["quantization_config"].items() if k != "transform_config"}
    config = QuantizationConfig.model_validate(quantization)
    found: dict[str, object] = {}
    for scheme in config.config_groups.values():
        if scheme.input_activations is not None:
            found.update({name: scheme.input_activations for name, _ in
                          match_named_modules(model, scheme.targets, config.ignore) if name not in found})
    if not found:
        return None
    kinds = {act_kind(a) for a in found.values()}
    first = next(iter(found.values()))
    if None in kinds or len({json.dumps(a.model_dump(), sort_keys=True, default=str) for a in found.values()}) > 1:
        raise CrossblockError(f"{path}: crossblock runs one dynamic activation scheme for every layer (nvfp4, mxfp4, "
                              f"fp8, or integers per token); this folder's input_activations are not that one")
    kind = kinds.pop()
    if kind == "int":
        scheme = act_scheme(first.num_bits, True, bool(first.symmetric))
    else:
        scheme = act_scheme(first.num_bits, True, True, kind)
    globs = {}
    if kind == "nvfp4":
        tensors = read_tensors(path)
        for name in found:
            key = f"{name}.input_global_scale"
            check_stored(FMT, name, tensors, {"input_global_scale": ((1,), torch.float32)})
            globs[name] = [tensors[key].item()]
    return {**scheme, "layers": {name: globs.get(name) for name in sorted(found)}}


def drop_transform_matrices(transforms: dict | None, tensors: dict):
    """Remove the run-time rotations' stored matrices: crossblock.load re-attaches the rotations
    from crossblock.json (api.load), which `save_compressed_tensors` wrote them from."""
    if not transforms:  # the library writes {} when there are none
        return
    from compressed_tensors.transform import TransformConfig
    try:
        groups = TransformConfig.model_validate(transforms).config_groups
    except ValueError as e:
        raise CrossblockError(f"compressed-tensors transform_config is malformed: {str(e).splitlines()[0]}") from None
    for key in [k for k in tensors if any(k.endswith(f".{g}_input.weight") for g in groups)]:
        del tensors[key]


def read_compressed_tensors(layout: nn.Module, quantization_config: dict, tensors: dict) -> dict[str, QuantizedWeight]:
    """Integer weights of every quantized layer; `layout` is the model's module tree."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules
    quantization_config = dict(quantization_config)
    drop_transform_matrices(quantization_config.pop("transform_config", None), tensors)
    # NVFP4 activations' global scales: crossblock.load re-attaches the quantizers from crossblock.json
    for key in [k for k in tensors if k.endswith(".input_global_scale")]:
        del tensors[key]
    config = QuantizationConfig.model_validate(quantization_config)
    if config.quantization_status != "compressed":
        raise CrossblockError(f"compressed-tensors folder has quantization_status "
                              f"{config.quantization_status!r}; crossblock reads compressed checkpoints")
    qweights = {}
    for scheme in config.config_groups.values():
        for name, _ in match_named_modules(layout, scheme.targets, config.ignore):
            if scheme.weights is not None and name not in qweights:
                qweights[name] = read_layer(tensors, name, scheme.weights, layer_shape(layout.get_submodule(name)))
    # fused MoE experts are stored as per-expert matrices, which the module tree does not have
    experts = [k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")]
    if experts and fused_expert_params(layout):
        schemes = [s for s in config.config_groups.values() if s.weights is not None]
        scheme = next((s for s in schemes if "Linear" in s.targets), schemes[0])
        per_expert = {name: read_layer(tensors, name, next((s for s in schemes if name in s.targets), scheme).weights)
                      for name in experts}
        qweights.update({f"{k}#experts": v for k, v in fuse_expert_layers(layout, per_expert).items()})
    return qweights

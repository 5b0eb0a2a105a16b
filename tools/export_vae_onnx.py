#!/usr/bin/env python3
"""Offline export of the Qwen-Image VAE decoder to ONNX, for x2v's engine manager (`trt/`: ONNX
Runtime with the TensorRT, CUDA or CPU execution provider).

    python tools/export_vae_onnx.py --model-dir DIR --out OUT [--static 1328x1328,1024x1024,...]
        [--dynamic [--min 256x256] [--max 1920x1920] [--opt 1024x1024,720x1280]]
        [--dtype fp32|fp16] [--opset N] [--no-verify]

DIR is a diffusers Qwen-Image model directory (`vae/config.json` and
`vae/diffusion_pytorch_model.safetensors`, or its shards) or that `vae/` folder itself. Sizes are image pixels
HxW (height x width), positive multiples of 16.

The graph interface (`trt/src/engine.rs` depends on it exactly):
  input  `latents`  [1, 16, 1, H/8, W/8]  normalised latents, as the pipelines hand them to the VAE
  output `image`    [1, 3, H, W]          `vae.decode(latents / (1 / std) + mean).sample[:, :, 0]`:
                                          the pipelines' decode, about [-1, 1], no postprocessing
  I/O dtype = --dtype, batch fixed to 1.
  static:  `decoder_{H}x{W}.onnx`, every dimension fixed.
  dynamic: `decoder_dynamic.onnx`, `latents` dims 3 and 4 named `latent_height` and `latent_width`,
           `image` dims 2 and 3 named `height` and `width`.
  metadata_props: x2v.graph = "qwen-image-vae-decoder", x2v.z_dim, x2v.scale_factor = "8",
  x2v.dtype, x2v.weights_sha256 (sha256 of the VAE's safetensors files, concatenated in file-name
  order), and x2v.min / x2v.max ("HxW") for
  the dynamic graph.
Each graph is one self-contained .onnx file, or, above 2 GB, the .onnx plus `<name>.onnx.data`.
`OUT/engines.toml` is the catalog `trt/src/catalog.rs` reads.

Export: the torch.onnx TorchScript exporter (`dynamo=False`) traces the decoder once, at a small
size with dynamic height and width; every file is made from that graph (a static file by fixing the
sizes). Two export-time substitutions leave the arithmetic unchanged:
  * The decoder upsamples with `nearest-exact`, which this exporter cannot translate. For integer
    scale factors it selects the same source pixel as `nearest` (floor((i + 0.5) / s) == floor(i / s)
    for integer s), so the upsamplers run as `nearest` while tracing: an ONNX Resize (nearest,
    asymmetric, floor) that every execution provider, TensorRT included, implements.
  * The attention block's `squeeze(1)` follows an attention whose ONNX shape the exporter cannot
    infer, so its stock translation is an If(dim == 1, Squeeze, Identity) whose branches differ in
    rank, which TensorRT cannot import. A plain Squeeze is exported instead (that axis is the single
    attention head, always 1).
Each file then has its constant subgraphs folded (the shape arithmetic the tracer records: a static
graph keeps no shape computation at all) and no-op Casts dropped, and is checked with onnxruntime's
CPU provider against the PyTorch module on random latents (static graph: at its size; dynamic graph:
at its minimum and at a second, non-square size other than the traced one, so that a shape frozen
at trace time fails). The reference is PyTorch in fp32 (for an fp16 graph, on the same latents
rounded to fp16); the check fails above 1e-3 max |diff| for fp32 graphs, 5e-2 for fp16 ones. It
runs the decoder at every static size on CPU, which for large sizes takes minutes and many GB (the
ONNX attention materialises its scores, (H/8 * W/8)^2 values); --no-verify skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import math
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

GRAPH_KIND = "qwen-image-vae-decoder"
INPUT, OUTPUT = "latents", "image"
SCALE = 8  # image pixels per latent pixel
MULTIPLE = 16  # image sides: the VAE's 8x and the pipelines' 2x2 latent packing
WEIGHTS = "diffusion_pytorch_model.safetensors"
CATALOG = "engines.toml"
MIN_OPSET = 17
MAX_OPSET = 20  # the TorchScript exporter's last
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}
TWO_GB = 2**31
# Constant subgraphs are folded only while their values stay this small (shape arithmetic, the
# latent statistics); larger constants are left to the runtime.
FOLD_MAX_ELEMENTS = 1 << 16
# engines.toml `memory_mib`, an estimate: the graph file twice (the weights as loaded, and what the
# provider builds from them) plus this many image-sized fp32 buffers of activations at the largest
# size the graph serves (the same rule as trt/src/catalog.rs uses for a catalog without one).
ACTIVATION_BUFFERS = 256


class ExportError(RuntimeError):
    """An export that produced no usable graph (the message says why)."""


@dataclass(frozen=True, order=True)
class Size:
    """An image size in pixels."""

    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // SCALE, self.width // SCALE

    def within(self, lo: Size, hi: Size) -> bool:
        return lo.height <= self.height <= hi.height and lo.width <= self.width <= hi.width


# The one size the decoder is traced at: small (a cheap CPU forward), not square, and unlike the
# sizes the dynamic graph is checked at.
TRACE_SIZE = Size(48, 80)


def parse_size(text: str, what: str = "size") -> Size:
    """`HxW` in image pixels, each a positive multiple of 16; ValueError naming the value otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"{what} {text!r}: expected HxW (height x width in pixels), e.g. 1024x1024")
    size = Size(int(m.group(1)), int(m.group(2)))
    for side, v in (("height", size.height), ("width", size.width)):
        if v <= 0 or v % MULTIPLE:
            raise ValueError(f"{what} {text!r}: {side} {v} is not a positive multiple of {MULTIPLE}")
    return size


def parse_sizes(text: str, what: str) -> list[Size]:
    sizes = [parse_size(part, what) for part in text.split(",") if part.strip()]
    if not sizes:
        raise ValueError(f"{what} {text!r}: expected a comma-separated list of HxW sizes")
    return sizes


@dataclass
class Profile:
    """The dynamic graph's range (and the TensorRT optimisation profiles' `opt` sizes)."""

    min: Size
    max: Size
    opt: list[Size] = field(default_factory=list)

    def __post_init__(self):
        if not self.min.within(self.min, self.max):
            raise ValueError(f"--min {self.min} exceeds --max {self.max}")
        if not self.opt:
            raise ValueError("--opt: at least one size is needed")
        for o in self.opt:
            if not o.within(self.min, self.max):
                raise ValueError(f"--opt {o} lies outside --min {self.min} .. --max {self.max}")

    def check_sizes(self) -> list[Size]:
        """Where the dynamic graph is checked: the minimum, and a second size that differs from it
        in both sides where the range allows, small (the check runs on CPU) and not square unless
        the range forces it."""
        second = Size(min(self.min.height + 2 * MULTIPLE, self.max.height),
                      min(self.min.width + 4 * MULTIPLE, self.max.width))
        if second == TRACE_SIZE and second.height + MULTIPLE <= self.max.height:
            second = Size(second.height + MULTIPLE, second.width)
        return [self.min] if second == self.min else [self.min, second]


def default_opt(lo: Size, hi: Size) -> Size:
    """1024x1024 (Qwen-Image's common size) clamped into lo..hi."""
    return Size(min(max(1024, lo.height), hi.height), min(max(1024, lo.width), hi.width))


@dataclass
class Exported:
    """One written graph, for the catalog and the summary table."""

    file: str
    shape: str
    size_mib: float
    export_s: float
    max_diff: float | None  # None: not checked
    static: Size | None = None
    profile: Profile | None = None
    memory_mib: int = 0
    trace_s: float = 0.0  # the trace all files of one export share


def find_vae(model_dir: Path) -> Path:
    """The `vae/` folder of a diffusers model directory, or `model_dir` if it is that folder."""
    for d in (model_dir / "vae", model_dir):
        if (d / "config.json").is_file():
            if not weight_files(d):
                raise ExportError(f"{d} has config.json but no .safetensors weights (.bin weights are not supported)")
            return d
    raise ExportError(f"{model_dir}: neither it nor {model_dir / 'vae'} holds a VAE config.json and {WEIGHTS}")


def weight_files(vae_dir: Path) -> list[Path]:
    """The VAE's safetensors files (one, or the shards of a sharded save), in file-name order."""
    return sorted(vae_dir.glob("*.safetensors"), key=lambda p: p.name)


def weights_sha256(vae_dir: Path) -> str:
    """SHA-256 of the VAE's weight files' bytes, concatenated in file-name order (x2v's decoder
    stage computes the same digest to refuse a graph exported from other weights)."""
    h = hashlib.sha256()
    for path in weight_files(vae_dir):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


class PipelineDecode(torch.nn.Module):
    """The Qwen-Image pipelines' decode of normalised latents (the lines after unpacking in
    `QwenImagePipeline.__call__`): mean and 1/std in the latents' dtype, `latents / (1/std) + mean`,
    `vae.decode(...).sample` (diffusers clamps it to [-1, 1]), first frame."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        z = vae.config.z_dim
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1), persistent=False)

    def forward(self, latents):
        latents = latents.to(self.vae.dtype)
        inv_std = 1.0 / self.std.to(latents.dtype)
        z = latents / inv_std + self.mean.to(latents.dtype)
        return self.vae.decode(z, return_dict=False)[0][:, :, 0]


def load_vae(vae_dir: Path, dtype: str):
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(str(vae_dir), torch_dtype=TORCH_DTYPE[dtype]).eval()
    vae.use_tiling = False  # a tiled decode is a different graph (and a different result)
    vae.use_slicing = False
    vae.requires_grad_(False)
    return vae


def _squeeze_symbolic(g, self, dim=None):
    from torch.onnx import symbolic_helper

    if symbolic_helper._is_none(dim):
        return g.op("Squeeze", self)
    if not symbolic_helper._is_constant(dim):
        raise ExportError("squeeze over a computed dim cannot be exported")
    try:
        axes = [symbolic_helper._get_const(dim, "i", "dim")]
    except Exception:
        axes = list(symbolic_helper._get_const(dim, "is", "dim"))
    return g.op("Squeeze", self, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.int64)))


@contextlib.contextmanager
def exportable(vae, opset: int):
    """The export-time substitutions described at the top of this file, undone afterwards."""
    upsamplers = [m for m in vae.modules() if isinstance(m, torch.nn.Upsample) and m.mode == "nearest-exact"]
    for m in upsamplers:
        factors = m.scale_factor if isinstance(m.scale_factor, tuple) else (m.scale_factor,)
        if m.size is not None or not all(float(f).is_integer() for f in factors):
            raise ExportError(f"nearest-exact upsampling by {m.scale_factor} (size {m.size}) has no exact ONNX Resize here")
    for m in upsamplers:
        m.mode = "nearest"
    torch.onnx.register_custom_op_symbolic("aten::squeeze", _squeeze_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::squeeze", opset)
        for m in upsamplers:
            m.mode = "nearest-exact"


def trace(module: PipelineDecode, dtype: str, opset: int, workdir: Path) -> onnx.ModelProto:
    """The decoder traced once at TRACE_SIZE with dynamic height and width: the graph every
    exported file is made from (a static file fixes the sizes and folds the shape arithmetic)."""
    z = module.vae.config.z_dim
    example = torch.randn(1, z, 1, *TRACE_SIZE.latent, generator=torch.Generator().manual_seed(0))
    axes = {INPUT: {3: "latent_height", 4: "latent_width"}, OUTPUT: {2: "height", 3: "width"}}
    chatter = io.StringIO()  # on a failure the exporter prints the whole TorchScript graph
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".export-") as tmp, exportable(module.vae, opset), \
            warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(chatter):
        # TracerWarnings about Python-level shape logic: the frame count is fixed at 1, and the
        # spatial sizes the decoder reads are recorded as shape ops (checked at other sizes).
        warnings.simplefilter("ignore")
        path = Path(tmp) / "graph.onnx"
        try:
            torch.onnx.export(module, (example.to(TORCH_DTYPE[dtype]),), str(path), input_names=[INPUT],
                              output_names=[OUTPUT], opset_version=opset, dynamo=False,
                              do_constant_folding=True, dynamic_axes=axes)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
        return onnx.load(str(path))


# ----- graph clean-up -----------------------------------------------------------------------------

def _numel(dims) -> int:
    return math.prod(int(d) for d in dims)


def _infer(model: onnx.ModelProto, big: set[str]) -> tuple[dict[str, list[int | None]], dict[str, int]]:
    """Value shapes and element types by ONNX shape inference, run on a copy without the weights
    (a >2 GB model cannot be serialised for it): large initializers become graph inputs."""
    g = model.graph
    inputs = list(g.input) + [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                              for i in g.initializer if i.name in big]
    small = [i for i in g.initializer if i.name not in big]
    skeleton = helper.make_model(helper.make_graph(list(g.node), g.name, inputs, list(g.output), small),
                                 opset_imports=list(model.opset_import), ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    shapes, types = {}, {i.name: i.data_type for i in g.initializer}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        types[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes, types


def _evaluate(node: onnx.NodeProto, feeds: dict, opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return [np.asarray(v) for v in ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)]


def _fold_node(node, consts, shapes, producers, opset):
    """The constant outputs of `node` if it can be computed now, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type == "Constant" or node.op_type.startswith("Random") \
            or node.op_type in ("Bernoulli", "Multinomial", "Dropout"):
        return None
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return None
    if node.op_type == "Shape":
        dims = shapes.get(node.input[0])
        if dims is None:
            return None
        attrs = {a.name: a.i for a in node.attribute}
        sel = dims[attrs.get("start", 0):attrs.get("end")]
        return [np.array(sel, dtype=np.int64)] if None not in sel else None
    if node.op_type == "Gather" and node.input[1] in consts:
        # size(i) of a partly dynamic tensor: Gather(Shape(x), i) is constant when dim i is static.
        src = producers.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if src is not None and src.op_type == "Shape" and not src.attribute and axis == 0:
            dims = shapes.get(src.input[0])
            idx = consts[node.input[1]]
            if dims is not None and idx.size <= len(dims):
                picked = np.array([dims[int(i)] for i in idx.reshape(-1)], dtype=object).reshape(idx.shape)
                if all(v is not None for v in picked.reshape(-1)):
                    return [picked.astype(np.int64)]
    names = [i for i in node.input if i]
    if not all(i in consts for i in names):
        return None
    outs = _evaluate(node, {i: consts[i] for i in names}, opset)
    return outs if all(o.size <= FOLD_MAX_ELEMENTS for o in outs) else None


def _prune(graph: onnx.GraphProto) -> None:
    """Drops nodes and initializers nothing reads."""
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(i for i in node.input if i)
    kept.reverse()
    graph.ClearField("node")
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in live]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)


def _drop_noop_casts(graph: onnx.GraphProto, types: dict[str, int]) -> None:
    """Removes Casts to the type their input already has (the exporter's translation of
    `.to(x.dtype)` in fp32), reading their input directly."""
    outputs = {o.name for o in graph.output}
    alias = {}
    for n in graph.node:
        if n.op_type == "Cast" and n.output[0] not in outputs and types.get(n.input[0]) is not None \
                and types[n.input[0]] == next(a.i for a in n.attribute if a.name == "to"):
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
    for n in graph.node:
        for k, name in enumerate(n.input):
            if name in alias:
                n.input[k] = alias[name]


def fold_constants(model: onnx.ModelProto, opset: int) -> None:
    """Replaces every subgraph whose value is known before any input arrives (the tracer's shape
    arithmetic, the padding vectors, the latent statistics) by a Constant, and drops no-op Casts,
    until nothing changes."""
    g = model.graph
    big = {i.name for i in g.initializer if _numel(i.dims) > FOLD_MAX_ELEMENTS}
    for _ in range(50):
        shapes, types = _infer(model, big)
        before = len(g.node)
        _drop_noop_casts(g, types)
        _prune(g)
        consts = {i.name: numpy_helper.to_array(i) for i in g.initializer if i.name not in big}
        producers = {o: n for n in g.node for o in n.output}
        nodes, changed = [], False
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                consts[node.output[0]] = (numpy_helper.to_array(value) if value is not None
                                          else _evaluate(node, {}, opset)[0])
                nodes.append(node)
                continue
            outs = _fold_node(node, consts, shapes, producers, opset)
            if outs is None:
                nodes.append(node)
                continue
            changed = True
            for name, value in zip(node.output, outs):
                consts[name] = value
                nodes.append(helper.make_node("Constant", [], [name], name=f"{node.name or name}/folded",
                                              value=numpy_helper.from_array(value)))
        g.ClearField("node")
        g.node.extend(nodes)
        _prune(g)
        if not changed and len(g.node) == before:
            return
    raise ExportError("constant folding did not settle")


def _set_shape(vi: onnx.ValueInfoProto, dims) -> None:
    shape = vi.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def finish(model: onnx.ModelProto, size: Size | None, z: int, opset: int, meta: dict[str, str]) -> None:
    """Fixes the I/O shapes (static: every dim; dynamic: named H/W), folds, checks the structure
    and stamps the metadata."""
    g = model.graph
    if [i.name for i in g.input] != [INPUT] or [o.name for o in g.output] != [OUTPUT]:
        raise ExportError(f"graph I/O is {[i.name for i in g.input]} -> {[o.name for o in g.output]}")
    if size is None:
        _set_shape(g.input[0], [1, z, 1, "latent_height", "latent_width"])
        _set_shape(g.output[0], [1, 3, "height", "width"])
    else:
        _set_shape(g.input[0], [1, z, 1, *size.latent])
        _set_shape(g.output[0], [1, 3, size.height, size.width])
    fold_constants(model, opset)
    g.ClearField("value_info")
    ops = {(n.domain or "ai.onnx", n.op_type) for n in g.node}
    bad = sorted(f"{d}::{o}" for d, o in ops if d != "ai.onnx" or o in ("If", "Loop", "Scan"))
    if bad:
        raise ExportError(f"the graph has control flow or non-standard ops TensorRT may not import: {bad}")
    if size is not None:
        left = sorted(o for _, o in ops if o in ("Shape", "Size"))
        if left:
            raise ExportError(f"the static graph still computes shapes at run time ({left})")
    del model.metadata_props[:]
    helper.set_model_props(model, meta)
    model.doc_string = f"x2v: Qwen-Image VAE decoder, normalised latents [1,{z},1,H/8,W/8] -> image [1,3,H,W]"


def save(model: onnx.ModelProto, path: Path) -> None:
    """One self-contained file below 2 GB, else the graph plus `<name>.data` next to it."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    weights = sum(len(i.raw_data) or numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    if weights < TWO_GB - (64 << 20):
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ----- check against PyTorch ----------------------------------------------------------------------

def check(path: Path, reference: PipelineDecode, sizes: list[Size], dtype: str, log) -> float:
    """Max |onnxruntime - torch| over `sizes` on random normal latents, torch being the fp32 decode
    (of the same latents rounded to the graph's dtype); ExportError if above the dtype's tolerance,
    if the I/O does not follow the interface, or if anything is not finite."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ins, outs = sess.get_inputs(), sess.get_outputs()
    want_type = "tensor(float)" if dtype == "fp32" else "tensor(float16)"
    if [i.name for i in ins] != [INPUT] or [o.name for o in outs] != [OUTPUT] or \
            {ins[0].type, outs[0].type} != {want_type}:
        raise ExportError(f"{path.name}: I/O {[(i.name, i.type) for i in ins]} -> {[(o.name, o.type) for o in outs]}")
    z = reference.vae.config.z_dim
    worst = 0.0
    for size in sizes:
        gen = torch.Generator().manual_seed(size.height * 100003 + size.width)
        latents = torch.randn(1, z, 1, *size.latent, generator=gen).to(TORCH_DTYPE[dtype])
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = reference(latents.float()).numpy()
        t1 = time.perf_counter()
        got = sess.run([OUTPUT], {INPUT: latents.numpy()})[0]
        t2 = time.perf_counter()
        if got.shape != (1, 3, size.height, size.width):
            raise ExportError(f"{path.name} at {size}: output shape {got.shape}")
        if not np.isfinite(got).all():
            raise ExportError(f"{path.name} at {size}: output is not finite")
        diff = float(np.abs(got.astype(np.float32) - ref).max())
        log(f"  {path.name} at {size}: max|diff| {diff:.3g} (torch {t1 - t0:.1f} s, onnxruntime {t2 - t1:.1f} s)")
        if not diff <= TOLERANCE[dtype]:
            raise ExportError(f"{path.name} at {size}: max|diff| {diff:.3g} vs torch exceeds {TOLERANCE[dtype]:g}")
        worst = max(worst, diff)
    return worst


# ----- the export ---------------------------------------------------------------------------------

def memory_mib(nbytes: int, largest: Size) -> int:
    return math.ceil((2 * nbytes + largest.height * largest.width * ACTIVATION_BUFFERS * 4) / 2**20)


def export_one(generic: onnx.ModelProto, reference, out: Path, size: Size | None, profile: Profile | None,
               dtype: str, opset: int, meta: dict[str, str], verify: bool, log) -> Exported:
    """Writes one graph made from the traced `generic` one (not modified) and checks it against
    the fp32 `reference`."""
    z = reference.vae.config.z_dim
    name = f"decoder_{size}.onnx" if size is not None else "decoder_dynamic.onnx"
    path = out / name
    t0 = time.perf_counter()
    model = onnx.ModelProto()
    model.CopyFrom(generic)
    meta = dict(meta)
    if profile is not None:
        meta.update({"x2v.min": str(profile.min), "x2v.max": str(profile.max)})
    finish(model, size, z, opset, meta)
    save(model, path)
    del model
    export_s = time.perf_counter() - t0
    nbytes = file_bytes(path)
    log(f"{name}: written ({nbytes / 2**20:.1f} MiB, {export_s:.1f} s)")
    diff = check(path, reference, [size] if size is not None else profile.check_sizes(), dtype, log) if verify else None
    if size is not None:
        shape = f"[1,{z},1,{size.latent[0]},{size.latent[1]}] -> [1,3,{size.height},{size.width}]"
    else:
        shape = f"[1,{z},1,h,w] -> [1,3,8h,8w], {profile.min}..{profile.max}"
    return Exported(name, shape, nbytes / 2**20, export_s, diff, static=size, profile=profile,
                    memory_mib=memory_mib(nbytes, size or profile.max))


def write_catalog(out: Path, weights: Path, dtype: str, done: list[Exported]) -> Path:
    lines = [f"# written by tools/export_vae_onnx.py from {weights}",
             "# memory_mib: an estimate, 2 x the graph file + "
             f"{ACTIVATION_BUFFERS} fp32 image-sized activation buffers at the largest size served",
             'dir = "."', f'precision = "{dtype}"']
    for e in done:
        if e.static is not None:
            lines += ["[[static]]", f'file = "{e.file}"', f"height = {e.static.height}", f"width = {e.static.width}",
                      f"memory_mib = {e.memory_mib}"]
    for e in done:
        if e.profile is not None:
            opt = ", ".join(f'"{o}"' for o in e.profile.opt)
            lines += ["[[profile]]", f'file = "{e.file}"', f'min = "{e.profile.min}"', f'max = "{e.profile.max}"',
                      f"opt = [{opt}]", f"memory_mib = {e.memory_mib}"]
    path = out / CATALOG
    path.write_text("\n".join(lines) + "\n")
    return path


def summary(done: list[Exported]) -> str:
    rows = [("file", "shape", "MiB", "export s", "max|diff| vs torch")]
    for e in done:
        rows.append((e.file, e.shape, f"{e.size_mib:.1f}", f"{e.export_s:.1f}",
                     "not checked" if e.max_diff is None else f"{e.max_diff:.2e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    if done:
        lines.append(f"(export s: each file's own; the one trace they share took {done[0].trace_s:.1f} s)")
    return "\n".join(lines)


def export(model_dir: Path, out: Path, statics: list[Size] = (), profile: Profile | None = None,
           dtype: str = "fp32", opset: int = MIN_OPSET, verify: bool = True, log=print) -> list[Exported]:
    """Exports the decoder graphs and writes `out/engines.toml`; returns what it wrote. Raises
    ExportError (no catalog written) if a graph cannot be made or fails its check."""
    if not statics and profile is None:
        raise ExportError("nothing to export: give static sizes and/or a dynamic profile")
    if dtype not in TORCH_DTYPE:
        raise ExportError(f"dtype {dtype!r}: expected fp32 or fp16")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset}: expected {MIN_OPSET}..{MAX_OPSET}")
    vae_dir = find_vae(Path(model_dir))
    weights = vae_dir.resolve()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CATALOG).unlink(missing_ok=True)  # the catalog describes this run's graphs only
    sha = weights_sha256(vae_dir)
    reference = PipelineDecode(load_vae(vae_dir, "fp32")).eval()
    z = reference.vae.config.z_dim
    if reference.vae.spatial_compression_ratio != SCALE:
        raise ExportError(f"the VAE's spatial compression is {reference.vae.spatial_compression_ratio}, not {SCALE}")
    meta = {"x2v.graph": GRAPH_KIND, "x2v.z_dim": str(z), "x2v.scale_factor": str(SCALE), "x2v.dtype": dtype,
            "x2v.weights_sha256": sha}
    log(f"VAE {vae_dir} (sha256 {sha[:16]}...), z_dim {z}, {dtype}; writing to {out}")
    t0 = time.perf_counter()
    # fp16 is traced from the weights loaded in fp16 (as diffusers casts them), and so computes the
    # norms and upsampling in fp32 exactly where diffusers does.
    generic = trace(reference if dtype == "fp32" else PipelineDecode(load_vae(vae_dir, dtype)).eval(), dtype, opset, out)
    trace_s = time.perf_counter() - t0
    log(f"traced at {TRACE_SIZE} with dynamic height and width (TorchScript exporter, opset {opset}): {trace_s:.1f} s")
    done = [export_one(generic, reference, out, s, None, dtype, opset, meta, verify, log) for s in statics]
    if profile is not None:
        done.append(export_one(generic, reference, out, None, profile, dtype, opset, meta, verify, log))
    for e in done:
        e.trace_s = trace_s
    write_catalog(out, weights, dtype, done)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path, help="diffusers Qwen-Image model directory, or its vae/")
    p.add_argument("--out", required=True, type=Path, help="directory for the graphs and engines.toml")
    p.add_argument("--static", default="", help="static graphs, comma-separated image sizes HxW (e.g. 1328x1328,1024x1024)")
    p.add_argument("--dynamic", action="store_true", help="also export one graph with dynamic height and width")
    p.add_argument("--min", help="dynamic graph: smallest image size HxW (default 256x256)")
    p.add_argument("--max", help="dynamic graph: largest image size HxW (default 1920x1920)")
    p.add_argument("--opt", help="dynamic graph: TensorRT profile sizes HxW, comma-separated (default 1024x1024 clamped into min..max)")
    p.add_argument("--dtype", default="fp32", choices=sorted(TORCH_DTYPE), help="graph I/O and weights dtype (default fp32)")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {MIN_OPSET})")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the onnxruntime-vs-torch check (it runs the decoder on CPU at every static size)")
    args = p.parse_args(argv)
    try:
        statics = parse_sizes(args.static, "--static") if args.static.strip() else []
        if len(set(statics)) != len(statics):
            raise ValueError(f"--static {args.static!r}: a size is listed twice")
        profile = None
        if args.dynamic:
            lo = parse_size(args.min or "256x256", "--min")
            hi = parse_size(args.max or "1920x1920", "--max")
            opt = parse_sizes(args.opt, "--opt") if args.opt else [default_opt(lo, hi)]
            profile = Profile(lo, hi, opt)
        elif args.min or args.max or args.opt:
            raise ValueError("--min/--max/--opt describe the dynamic graph: add --dynamic")
        if not statics and profile is None:
            raise ValueError("nothing to export: give --static sizes and/or --dynamic")
        if not MIN_OPSET <= args.opset <= MAX_OPSET:
            raise ValueError(f"--opset {args.opset}: expected {MIN_OPSET}..{MAX_OPSET}")
        find_vae(args.model_dir)
    except (ValueError, ExportError) as e:
        p.error(str(e))
    try:
        done = export(args.model_dir, args.out, statics, profile, args.dtype, args.opset, not args.no_verify)
    except ExportError as e:
        print(f"export_vae_onnx: error: {e}", file=sys.stderr)
        return 1
    print()
    print(summary(done))
    print(f"\ncatalog: {args.out / CATALOG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Qwen-Image served through the disaggregated pipeline: gateway -> encoder -> DiT -> decoder, each a
separate process, jobs in Redis, driven by the official openai client's images API.

The models are the tiny Qwen-Image pipelines of `tools/fixtures/qwen_pipeline.py` (text to image and
EditPlus); a served image must equal, pixel for pixel, what `x2v generate` writes for the same
settings (the same stage code runs in one process there), for one image and for `n` = 2. Streaming
sends genuine previews (`partial_images`) before the final images. A third model, the text-to-image
pipeline again, has a decoder that decodes on ONNX Runtime engines exported from its VAE
(`tools/export_vae_onnx.py`), with libtorch for the sizes no engine serves.
"""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from x2v_testing import ROOT, TARGET, Process, RedisServer, write_config

from conftest import API_KEY, Stage

T2I, EDIT, ENGINES = "qwen-e2e-t2i", "qwen-e2e-edit-plus", "qwen-e2e-t2i-engines"
STEPS = 2
# Not the pipelines' default (" "), so that the served image shows the field reached the encoder.
NEGATIVE = "blurry, low quality"


def image_entry(name, task):
    # An edit without a size gets ~1 MP at its last image's aspect (`auto`), as diffusers' edits.
    sizes = ["96x64", "64x64"] + (["auto"] if task == "edit" else [])
    return {
        "name": name, "tasks": [task], "sizes": sizes, "fps": 0, "max_frames": 1,
        "default_seconds": 0, "default_steps": STEPS, "max_steps": 50, "default_guidance_scale": 4.0,
        "default_shift": 3.0, "max_n": 2, "max_input_images": 2,
    }


class ImageCluster:
    """Redis, a gateway serving the two tiny Qwen-Image models, and their three stage services each
    (ranks after nothing else: this cluster has its own Redis)."""

    def __init__(self, x2v_bin, workdir, fixtures):
        self.bin, self.dir, self.fixtures = x2v_bin, workdir, fixtures
        self.prefix = "x2v-e2e-images"
        self.storage = os.path.join(workdir, "outputs")
        self.models = {T2I: fixtures / "t2i", EDIT: fixtures / "edit_plus", ENGINES: fixtures / "t2i"}
        self.catalog = export_engines(fixtures / "t2i", Path(workdir) / "engines")
        self.redis = RedisServer(workdir)
        self.procs = [self._gateway()]
        self.gateway = self.procs[0]
        self.stages = {}
        for rank, (model, task) in enumerate([(T2I, "t2i"), (EDIT, "edit"), (ENGINES, "t2i")]):
            for kind in ["encoder", "dit", "decoder"]:
                extra = None
                if model == ENGINES and kind == "decoder":
                    extra = {"vae": {"backend": "onnx", "engines": str(self.catalog)}}
                stage = Stage(self, kind, model, self.models[model], task, rank, extra=extra)
                self.procs.append(stage)
                self.stages[(model, kind)] = stage

    def _gateway(self):
        config = {
            "queue": {"backend": "redis", "redis_url": self.redis.url, "prefix": self.prefix,
                      "maintain_interval_ms": 200},
            "storage": {"kind": "local", "path": self.storage},
            "auth": {"api_keys": [API_KEY]},
            # Generous: a ~1 MP edit takes a minute alone and several with other suites beside it;
            # the bound only catches a job that never ends.
            "http": {"poll_after_ms": 50, "image_timeout_s": 600},
            "models": [image_entry(T2I, "t2i"), image_entry(EDIT, "edit"), image_entry(ENGINES, "t2i")],
            "telemetry": {"log_format": "text", "log_level": "warn"},
        }
        path = write_config(Path(self.dir) / "gateway.json", config)
        gw = Process("gateway", [str(self.bin), "gateway", "--config", str(path), "--listen", "127.0.0.1:0",
                                 "--print-addr"],
                     dict(os.environ, RUST_LOG="warn"), lambda l: l.startswith("listening on "))
        gw.base_url = f"http://{gw.ready_line.split()[-1]}/v1"
        return gw

    def logs(self) -> str:
        return "\n".join(p.log() for p in self.procs)

    def close(self):
        for p in self.procs:
            p.kill()
        self.redis.kill()


def export_engines(model_dir: Path, out: Path) -> Path:
    """The model's VAE decoder as ONNX graphs: a static engine for 64x96 (the fixture's size) and a
    profile engine for 16x16 .. 48x48; 64x64 is served by none. Returns the catalog."""
    subprocess.run([sys.executable, str(ROOT / "tools/export_vae_onnx.py"), "--model-dir", str(model_dir),
                    "--out", str(out), "--static", "64x96", "--dynamic", "--min", "16x16", "--max", "48x48",
                    "--opt", "32x32"], check=True, capture_output=True)
    return out / "engines.toml"


def generator_sources(tools: Path, script: Path):
    """The script and the modules it imports from tools/fixtures/ or tools/, transitively (as
    x2v-testkit's `fixture`)."""
    sources = [script]
    for source in sources:
        for line in source.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and (words[0] == "import" or (words[0] == "from" and "import" in words[2:3])):
                name = f"{words[1].rstrip(',')}.py"
                sibling = next((p for p in (tools / name, tools.parent / name) if p.exists()), None)
                if sibling is not None and sibling not in sources:
                    sources.append(sibling)
    return sources


def fixture_dir(name: str) -> Path:
    """`tools/fixtures/<name>.py`'s output, cached where the Rust parity tests cache it
    (`$CARGO_TARGET_DIR/x2v-fixtures/<name>-<FNV-1a of the generator sources>`), generated if absent."""
    tools = ROOT / "tools/fixtures"
    h = 0xCBF29CE484222325
    for source in generator_sources(tools, tools / f"{name}.py"):
        for b in source.read_bytes():
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    base = Path(os.environ.get("X2V_FIXTURE_CACHE", TARGET / "x2v-fixtures"))
    out = base / f"{name}-{h:016x}"
    if (out / ".complete").exists():
        return out
    tmp = base / f".{name}-{h:016x}-e2e-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run([sys.executable, str(tools / f"{name}.py"), "--out", str(tmp)], check=True,
                   capture_output=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    (tmp / ".complete").touch()
    try:
        tmp.rename(out)
    except OSError:  # generated meanwhile by another run: either copy is valid
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="module")
def qwen_fixtures():
    """The tiny Qwen-Image pipelines (t2i/, edit_plus/), their settings and input images."""
    return fixture_dir("qwen_pipeline")


@pytest.fixture(scope="module")
def images_cluster(x2v_bin, qwen_fixtures):
    workdir = tempfile.mkdtemp(prefix="x2v-e2e-images-")
    c = ImageCluster(x2v_bin, workdir, qwen_fixtures)
    yield c
    c.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def client(images_cluster):
    import openai

    return openai.OpenAI(base_url=images_cluster.gateway.base_url, api_key=API_KEY, max_retries=0,
                         timeout=660)


@pytest.fixture(autouse=True)
def logs_on_failure(request, images_cluster):
    """Prints the services' recent output when a test fails (this module's cluster, not the videos')."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(images_cluster.logs())


def settings(fixtures, case):
    s = json.loads((fixtures / f"{case}.json").read_text())
    return s["prompt"], NEGATIVE, s["seed"], f"{s['width']}x{s['height']}"


def x2v_generate(cluster, tmp_path, model, task, prompt, negative, size, seed, images=(), n=1, steps=STEPS):
    """`x2v generate` of the same image(s) in one process, as `uint8 [H, W, 3]` (a list for n > 1);
    `size` None: the pipeline's own choice."""
    out = tmp_path / f"{task}.npy"
    argv = [str(cluster.bin), "generate", "--model-dir", str(cluster.models[model]), "--task", task,
            "--prompt", prompt, "--negative-prompt", negative, "--steps", str(steps),
            "--guidance", "4", "--seed", str(seed), "--n", str(n), "--out", str(out)]
    if size is not None:
        argv += ["--size", size]
    for image in images:
        argv += ["--image", str(image)]
    subprocess.run(argv, check=True, capture_output=True)
    if n == 1:
        return np.load(out)
    return [np.load(tmp_path / f"{task}-{i}.npy") for i in range(n)]


def pixels(b64_png) -> np.ndarray:
    data = base64.b64decode(b64_png)
    assert data.startswith(b"\x89PNG"), "the default output format is PNG"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def sampling(negative, seed):
    return {"negative_prompt": negative, "seed": seed, "num_inference_steps": STEPS, "guidance_scale": 4.0}


def test_served_text_to_image_equals_x2v_generate(client, images_cluster, tmp_path):
    prompt, negative, seed, size = settings(images_cluster.fixtures, "t2i")
    assert size == "96x64"
    served = client.images.generate(model=T2I, prompt=prompt, size=size, extra_body=sampling(negative, seed))
    image = pixels(served.data[0].b64_json)
    assert image.shape == (64, 96, 3)
    local = x2v_generate(images_cluster, tmp_path, T2I, "t2i", prompt, negative, size, seed)
    assert np.array_equal(image, local), f"max |diff| {np.abs(image.astype(int) - local).max()}"


def test_served_edit_of_two_images_equals_x2v_generate(client, images_cluster, tmp_path):
    prompt, negative, seed, size = settings(images_cluster.fixtures, "edit_plus")
    inputs = [images_cluster.fixtures / f"edit_plus_image_{i}.png" for i in range(2)]
    with open(inputs[0], "rb") as a, open(inputs[1], "rb") as b:
        served = client.images.edit(model=EDIT, image=[a, b], prompt=prompt, size=size,
                                    extra_body=sampling(negative, seed))
    image = pixels(served.data[0].b64_json)
    local = x2v_generate(images_cluster, tmp_path, EDIT, "edit", prompt, negative, size, seed, inputs)
    assert np.array_equal(image, local), f"max |diff| {np.abs(image.astype(int) - local).max()}"
    # The order of the uploads matters (image i is "Picture i+1" and image_latents.i).
    with open(inputs[1], "rb") as b, open(inputs[0], "rb") as a:
        swapped = client.images.edit(model=EDIT, image=[b, a], prompt=prompt, size=size,
                                     extra_body=sampling(negative, seed))
    assert not np.array_equal(pixels(swapped.data[0].b64_json), local)


def test_an_edit_without_a_size_is_about_one_megapixel_at_the_last_images_aspect(client, images_cluster, tmp_path):
    prompt, negative, _, _ = settings(images_cluster.fixtures, "edit_plus")
    inputs = [images_cluster.fixtures / f"edit_plus_image_{i}.png" for i in range(2)]
    body = sampling(negative, 3)
    with open(inputs[0], "rb") as a, open(inputs[1], "rb") as b:
        served = client.images.edit(model=EDIT, image=[a, b], prompt=prompt, extra_body=body)
    image = pixels(served.data[0].b64_json)
    assert served.size == "1312x800" and image.shape == (800, 1312, 3), (served.size, image.shape)
    local = x2v_generate(images_cluster, tmp_path, EDIT, "edit", prompt, negative, None, 3, inputs)
    assert np.array_equal(image, local), f"max |diff| {np.abs(image.astype(int) - local).max()}"


def test_an_unreadable_edit_image_is_refused_naming_image(client, images_cluster):
    import openai

    good = (images_cluster.fixtures / "edit_plus_image_0.png").read_bytes()
    # A PNG signature passes the gateway's sniffing; the encoder cannot decode the rest.
    broken = good[:40]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(model=EDIT, image=[("a.png", good, "image/png"), ("b.png", broken, "image/png")],
                           prompt="x", size="64x64", extra_body={"num_inference_steps": STEPS})
    error = e.value.body
    assert error["code"] == "invalid_image", error
    assert "`image` 2 is not a readable image" in error["message"], error


def test_two_images_per_request_equal_x2v_generate(client, images_cluster, tmp_path):
    prompt, negative, seed, size = settings(images_cluster.fixtures, "t2i")
    served = client.images.generate(model=T2I, prompt=prompt, size=size, n=2,
                                    extra_body=sampling(negative, seed))
    images = [pixels(d.b64_json) for d in served.data]
    assert len(images) == 2
    local = x2v_generate(images_cluster, tmp_path, T2I, "t2i", prompt, negative, size, seed, n=2)
    for i, (a, b) in enumerate(zip(images, local)):
        assert np.array_equal(a, b), f"image {i}: max |diff| {np.abs(a.astype(int) - b).max()}"
    assert not np.array_equal(images[0], images[1]), "two images of one seed are two draws"
    # Image 0 of n = 2 is not the n = 1 image: the batch is one draw from the seed, as diffusers.
    single = client.images.generate(model=T2I, prompt=prompt, size=size, extra_body=sampling(negative, seed))
    assert pixels(single.data[0].b64_json).shape == images[0].shape
    # `url` answers name each image.
    urls = client.images.generate(model=T2I, prompt=prompt, size=size, n=2, response_format="url",
                                  extra_body=sampling(negative, seed))
    assert [d.url.rsplit("=", 1)[1] for d in urls.data] == ["0", "1"]


def stream_events(stream):
    events = list(stream)
    kinds = [e.type for e in events]
    return events, kinds


def test_streaming_sends_genuine_partial_images(client, images_cluster):
    prompt, negative, seed, size = settings(images_cluster.fixtures, "t2i")
    body = dict(sampling(negative, seed), num_inference_steps=4)
    stream = client.images.generate(model=T2I, prompt=prompt, size=size, n=2, stream=True, partial_images=2,
                                    extra_body=body)
    events, kinds = stream_events(stream)
    assert kinds.count("image_generation.partial_image") == 4, kinds
    assert kinds[-2:] == ["image_generation.completed"] * 2, kinds
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    finals = [pixels(e.b64_json) for e in events if e.type == "image_generation.completed"]
    raw = [json.loads(e.model_dump_json()) for e in partials]
    assert sorted((r["image_index"], r["partial_image_index"]) for r in raw) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r, e in zip(raw, partials):
        preview = pixels(e.b64_json)
        final = finals[r["image_index"]]
        assert preview.shape == final.shape
        # A look at the image being made, not the final image sent early.
        assert not np.array_equal(preview, final)
    # Previews are of their own image: image 0's last preview is nearer image 0 than image 1.
    last = {r["image_index"]: pixels(e.b64_json) for r, e in zip(raw, partials) if r["partial_image_index"] == 1}
    d = lambda a, b: np.abs(a.astype(int) - b).mean()
    assert d(last[0], finals[0]) < d(last[0], finals[1]), (d(last[0], finals[0]), d(last[0], finals[1]))
    # The final images are those of the same request without streaming.
    plain = client.images.generate(model=T2I, prompt=prompt, size=size, n=2, extra_body=body)
    for a, b in zip(finals, plain.data):
        assert np.array_equal(a, pixels(b.b64_json))


def test_streamed_edit_sends_edit_partial_images(client, images_cluster):
    prompt, negative, seed, size = settings(images_cluster.fixtures, "edit_plus")
    inputs = [images_cluster.fixtures / f"edit_plus_image_{i}.png" for i in range(2)]
    with open(inputs[0], "rb") as a, open(inputs[1], "rb") as b:
        stream = client.images.edit(model=EDIT, image=[a, b], prompt=prompt, size=size, stream=True,
                                    partial_images=1, extra_body=dict(sampling(negative, seed), num_inference_steps=3))
        events, kinds = stream_events(stream)
    assert kinds == ["image_edit.partial_image", "image_edit.completed"], kinds
    assert events[0].partial_image_index == 0
    assert pixels(events[0].b64_json).shape == pixels(events[1].b64_json).shape


def test_a_mask_is_refused_rather_than_ignored(client, images_cluster):
    import openai

    png = (images_cluster.fixtures / "edit_plus_image_0.png").read_bytes()
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(model=EDIT, image=[("a.png", png, "image/png")], mask=("m.png", png, "image/png"),
                           prompt="x", size="64x64", extra_body={"num_inference_steps": STEPS})
    assert "`mask` is not supported" in e.value.body["message"], e.value.body


@pytest.mark.parametrize("case", ["too_many_images", "unsupported_size", "not_an_image", "n_above_max"])
def test_bad_image_requests_are_refused_naming_the_parameter(client, images_cluster, case):
    import openai

    png = (images_cluster.fixtures / "edit_plus_image_0.png").read_bytes()
    with pytest.raises(openai.BadRequestError) as e:
        if case == "too_many_images":
            client.images.edit(model=EDIT, image=[("a.png", png, "image/png")] * 3, prompt="x", size="64x64")
        elif case == "unsupported_size":
            client.images.generate(model=T2I, prompt="x", size="1024x1024")
        elif case == "not_an_image":
            client.images.edit(model=EDIT, image=[("a.png", b"just some text", "image/png")], prompt="x",
                               size="64x64")
        else:
            client.images.generate(model=T2I, prompt="x", size="64x64", n=3)
    error = e.value.body
    param = {"too_many_images": "image", "unsupported_size": "size", "not_an_image": "image",
             "n_above_max": "n"}[case]
    assert error["param"] == param, error
    assert e.value.status_code == 400


def test_engines_decode_the_sizes_they_serve_and_libtorch_the_rest(client, images_cluster, tmp_path):
    prompt, negative, seed, size = settings(images_cluster.fixtures, "t2i")
    decoder = images_cluster.stages[(ENGINES, "decoder")]
    decodes = "x2v_vae_decodes_total"
    assert decoder.metrics().get(decodes, 0) == 0
    # 96x64 has a static engine: ONNX Runtime on the CPU decodes it, within one level of libtorch.
    served = client.images.generate(model=ENGINES, prompt=prompt, size=size, extra_body=sampling(negative, seed))
    image = pixels(served.data[0].b64_json)
    local = x2v_generate(images_cluster, tmp_path, T2I, "t2i", prompt, negative, size, seed)
    diff = np.abs(image.astype(int) - local)
    assert (diff <= 1).mean() >= 0.999, f"max |diff| {diff.max()}"
    assert decoder.metrics(backend="onnx_cpu", reason="none")[decodes] == 1
    # No engine serves 64x64: libtorch decodes it, exactly as `x2v generate`, and says why.
    served = client.images.generate(model=ENGINES, prompt=prompt, size="64x64", extra_body=sampling(negative, seed))
    local = x2v_generate(images_cluster, tmp_path, T2I, "t2i", prompt, negative, "64x64", seed)
    assert np.array_equal(pixels(served.data[0].b64_json), local)
    assert decoder.metrics(backend="torch", reason="no_engine_for_shape")[decodes] == 1
    assert decoder.metrics()["x2v_vae_engine_loads_total"] == 1

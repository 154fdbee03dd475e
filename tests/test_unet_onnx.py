"""Accelerated UNet backends: ONNX export + ONNX Runtime against torch, TensorRT up to the import
boundary, the `export-unet` command and the refiner benchmark.

Everything runs the tiny dual-attention UNet at 8x8 latents (64x64 images): an export takes
about a second, a step a few milliseconds.
"""
import json
import os

import numpy as np
import pytest
import torch

from spikevaediff.core.config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS, ModelProfile
from spikevaediff.core.errors import UserError
from spikevaediff.core.refiner import Refiner
from spikevaediff.core.tiny import write_tiny_clip
from spikevaediff.core.tiny_vd import tiny_image_unet, tiny_text_unet, write_tiny_versatile_diffusion
from spikevaediff.core.unet_backends import TorchUNetBackend, UNetBackend, make_backend
from spikevaediff.core.unet_export import read_metadata, unet_fingerprint
from spikevaediff.core.unet_onnx import OnnxUNetBackend, export_unet_onnx, select_providers, session_options
from spikevaediff.core.vd_compat import set_mix_ratio, to_dual_attention
from spikevaediff.core.vd_loader import load_versatile_diffusion

CONTEXT = CLIP_TEXT_TOKENS + CLIP_IMAGE_TOKENS
LATENT = 8
SIZE = 8 * LATENT

try:
    import tensorrt  # noqa: F401
    HAVE_TENSORRT = True
except ImportError:
    HAVE_TENSORRT = False


def dual_unet(seed=0, share=0.4):
    torch.manual_seed(seed)
    unet = tiny_image_unet()
    to_dual_attention(unet, tiny_text_unet())
    set_mix_ratio(unet, share)
    return unet.eval()


def unet_inputs(batch, seed=1, dim=64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, LATENT, LATENT, generator=generator),
            torch.randn(batch, CONTEXT, dim, generator=generator))


@pytest.fixture(scope="module")
def unet():
    return dual_unet()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny weights folder (CLIP + Versatile Diffusion) laid out as ModelProfile('tiny') expects."""
    root = tmp_path_factory.mktemp("weights")
    clip = write_tiny_clip(root / "clip-tiny", seed=0)
    write_tiny_versatile_diffusion(root / "versatile-diffusion-tiny", clip, seed=0)
    return root


@pytest.fixture(scope="module")
def components(weights):
    return load_versatile_diffusion(weights / "versatile-diffusion-tiny")


# ----- export + ONNX Runtime against torch -----

@pytest.mark.parametrize("batch", [1, 2])
def test_exported_unet_matches_torch(unet, tmp_path, batch):
    path = export_unet_onnx(unet, tmp_path / "unet.onnx", LATENT, CONTEXT, 64, batch=batch)
    meta = read_metadata(path)
    assert (meta["batch"], meta["latent_hw"], meta["context_len"], meta["dim"]) == (batch, [8, 8], CONTEXT, 64)
    assert meta["mix_ratio"] == pytest.approx(0.4) and meta["fingerprint"] == unet_fingerprint(unet)

    onnx_backend, torch_backend = OnnxUNetBackend(path, threads=1), TorchUNetBackend(unet)
    latents, context = unet_inputs(batch)
    outputs = {}
    for t in (torch.tensor(20), torch.tensor(900)):
        got, expected = onnx_backend(latents, t, context), torch_backend(latents, t, context)
        assert got.shape == latents.shape and got.dtype == latents.dtype
        assert (got - expected).abs().max() < 1e-4
        outputs[int(t)] = got
    # the timestep is a real input, not a constant folded in at export
    assert (outputs[20] - outputs[900]).abs().max() > 1e-3


def test_dynamic_batch_export_runs_any_batch(unet, tmp_path):
    path = export_unet_onnx(unet, tmp_path / "dyn.onnx", LATENT, dynamic_batch=True)
    assert read_metadata(path)["batch"] is None
    backend = OnnxUNetBackend(path, threads=1)
    for batch in (1, 3):
        latents, context = unet_inputs(batch, seed=batch)
        expected = TorchUNetBackend(unet)(latents, torch.tensor(500), context)
        assert (backend(latents, torch.tensor(500), context) - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_dynamo_exporter_matches_torch(unet, tmp_path):
    path = export_unet_onnx(unet, tmp_path / "dynamo.onnx", LATENT, batch=2, exporter="dynamo")
    assert read_metadata(path)["opset"] >= 18  # the dynamo translator's minimum
    latents, context = unet_inputs(2)
    expected = TorchUNetBackend(unet)(latents, torch.tensor(300), context)
    assert (OnnxUNetBackend(path, threads=1)(latents, torch.tensor(300), context) - expected).abs().max() < 1e-4


def test_shape_and_file_problems_are_user_errors(unet, tmp_path):
    path = export_unet_onnx(unet, tmp_path / "b2.onnx", LATENT, batch=2)
    backend = OnnxUNetBackend(path, threads=1)
    latents, context = unet_inputs(1)
    with pytest.raises(UserError, match="exported for latents 2x4x8x8, got 1x4x8x8"):
        backend(latents, torch.tensor(1), context)
    with pytest.raises(UserError, match="does not exist"):
        OnnxUNetBackend(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model" * 10)
    with pytest.raises(UserError, match="not a readable ONNX file|not exported by spikevaediff"):
        OnnxUNetBackend(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match="unknown ONNX exporter"):
        export_unet_onnx(unet, tmp_path / "x.onnx", LATENT, exporter="magic")
    with pytest.raises(UserError, match="not available here"):
        OnnxUNetBackend(path, providers=["NoSuchExecutionProvider"])


def test_providers_and_cpu_session_options():
    import onnxruntime as ort

    chosen = [name for name, _ in select_providers()]
    available = ort.get_available_providers()
    assert chosen[-1] == "CPUExecutionProvider" and all(p in available for p in chosen)
    if "CUDAExecutionProvider" in available:  # a GPU build prefers the GPU
        assert chosen.index("CUDAExecutionProvider") < chosen.index("CPUExecutionProvider")
    options = session_options(threads=3)
    assert options.intra_op_num_threads == 3
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


# ----- the backend as the refiner uses it -----

def test_cached_backend_follows_the_text_share_and_reuses_files(tmp_path):
    unet = dual_unet()
    backend = make_backend("onnx", unet, cache_dir=tmp_path, threads=1)
    assert isinstance(backend, UNetBackend)
    latents, context = unet_inputs(2)
    t = torch.tensor(400)
    first = backend(latents, t, context)
    set_mix_ratio(unet, 0.9)  # what Refiner.configure(text_share=0.9) does
    second = backend(latents, t, context)
    assert (second - TorchUNetBackend(unet)(latents, t, context)).abs().max() < 1e-4
    assert (first - second).abs().max() > 1e-4  # the share is really baked into each file
    files = sorted(tmp_path.glob("*.onnx"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    again = make_backend("onnx", unet, cache_dir=tmp_path, threads=1)
    assert (again(latents, t, context) - second).abs().max() == 0
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.glob("*.onnx"))] == stamps  # reused, not re-exported


def test_explicit_path_is_checked_against_the_unet(tmp_path):
    unet = dual_unet()
    path = tmp_path / "given.onnx"
    with pytest.raises(UserError, match="give latent_hw"):
        make_backend("onnx", unet, path=path)
    backend = make_backend("onnx", unet, path=path, latent_hw=LATENT, threads=1)
    assert path.is_file() and backend.describe().startswith("onnx (")
    set_mix_ratio(unet, 0.7)
    with pytest.raises(UserError, match="text share"):
        backend(*unet_inputs(2)[:1], torch.tensor(1), unet_inputs(2)[1])
    with pytest.raises(UserError, match="text share 0.400 but the refiner uses 0.700"):
        make_backend("onnx", unet, path=path)
    with pytest.raises(UserError, match="other UNet weights"):
        make_backend("onnx", dual_unet(seed=5, share=0.4), path=path)


def test_refiner_gives_the_same_image_through_torch_and_onnx(components, tmp_path):
    rng = np.random.default_rng(0)
    vision = rng.standard_normal((CLIP_IMAGE_TOKENS, components.embed_dim)).astype(np.float32)
    text = rng.standard_normal((CLIP_TEXT_TOKENS, components.embed_dim)).astype(np.float32)
    preview = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    settings = dict(scheduler="dpmsolver++", steps=7, strength=0.75, image_size=SIZE)
    images = {}
    for backend in ("torch", "onnx"):
        refiner = Refiner.from_components(components, backend=backend,
                                          backend_options={"cache_dir": tmp_path} if backend == "onnx" else {},
                                          **settings)
        images[backend] = refiner.refine(preview, vision, text, seed=3, output_type="float")
        assert refiner.backend.describe().startswith(backend)
    assert images["torch"].shape == (SIZE, SIZE, 3)
    assert np.abs(images["torch"] - images["onnx"]).max() < 1e-4
    other_seed = Refiner.from_components(components, **settings).refine(preview, vision, text, seed=4,
                                                                        output_type="float")
    assert np.abs(other_seed - images["onnx"]).max() > 1e-2


# ----- TensorRT: up to the import boundary here, the real engine where it imports -----

@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed; the engine test covers this host")
def test_tensorrt_absent_is_a_one_line_user_error(unet, components, tmp_path):
    from spikevaediff.core.unet_tensorrt import (TensorRTUNetBackend, build_engine, read_sidecar,
                                                 write_sidecar)

    for attempt in (lambda: make_backend("tensorrt", unet),
                    lambda: Refiner.from_components(components, backend="tensorrt", image_size=SIZE)):
        with pytest.raises(UserError) as info:
            attempt()
        assert "tensorrt" in str(info.value).lower() and "\n" not in str(info.value)
    with pytest.raises(UserError, match="batch must be at least 1"):  # options are checked first
        make_backend("tensorrt", unet, batch=0)

    # what needs no TensorRT works: file checks, the sidecar an engine carries
    with pytest.raises(UserError, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "e.plan")
    onnx_file = export_unet_onnx(unet, tmp_path / "u.onnx", LATENT)
    with pytest.raises(UserError, match="TensorRT"):
        build_engine(onnx_file, tmp_path / "e.plan")
    assert not (tmp_path / "e.plan").exists()
    write_sidecar(onnx_file, tmp_path / "e.plan", fp16=True)
    sidecar = read_sidecar(tmp_path / "e.plan")
    assert sidecar["mix_ratio"] == pytest.approx(0.4) and sidecar["build"] == {"fp16": True}
    with pytest.raises(UserError, match="does not exist"):
        TensorRTUNetBackend(tmp_path / "e.plan")


@pytest.mark.skipif(not HAVE_TENSORRT, reason="tensorrt is not installed (CPU machines cannot install it)")
def test_tensorrt_engine_matches_torch(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("tensorrt imports but there is no CUDA device")
    from spikevaediff.core.unet_tensorrt import TensorRTUNetBackend, build_engine

    unet = dual_unet().cuda()
    onnx_file = export_unet_onnx(unet, tmp_path / "u.onnx", LATENT, batch=2)
    engine = build_engine(onnx_file, tmp_path / "u.plan", fp16=False)
    latents, context = (x.cuda() for x in unet_inputs(2))
    expected = TorchUNetBackend(unet)(latents, torch.tensor(500), context)
    for graph in (False, True):
        backend = TensorRTUNetBackend(engine, cuda_graph=graph, unet=unet)
        for _ in range(2):  # the second call replays the captured graph
            assert (backend(latents, torch.tensor(500), context) - expected).abs().max() < 1e-3


# ----- export-unet command -----

def run_cli(argv, capsys):
    from spikevaediff.services import cli

    modules = list(cli.COMMAND_MODULES)
    if "spikevaediff.services.commands_export" not in modules:  # until the lead registers it
        modules.append("spikevaediff.services.commands_export")
    saved, cli.COMMAND_MODULES = cli.COMMAND_MODULES, modules
    try:
        code = cli.main(argv)
    finally:
        cli.COMMAND_MODULES = saved
    return code, capsys.readouterr()


def test_export_unet_command_writes_an_onnx_file(weights, tmp_path, capsys):
    out = tmp_path / "out" / "unet.onnx"
    code, captured = run_cli(["export-unet", "--profile", "tiny", "--weights", str(weights), "--out", str(out),
                              "--image-size", str(SIZE), "--text-share", "0.3"], capsys)
    assert code == 0 and out.is_file() and "wrote" in captured.out
    meta = read_metadata(out)
    assert (meta["batch"], meta["latent_hw"], meta["mix_ratio"]) == (2, [LATENT, LATENT], pytest.approx(0.3))


def test_export_unet_from_a_bundle(weights, tmp_path, capsys):
    from spikevaediff.core.bundle import BundleManifest, write_bundle
    from spikevaediff.core.ridge import RidgeRegression

    rng = np.random.default_rng(0)
    units = [("s1", 1), ("s1", 2), ("s1", 3)]
    ridge = RidgeRegression(alpha=1.0).fit(rng.normal(size=(20, 3)), rng.normal(size=(20, 4)))
    bundle = write_bundle(tmp_path / "bundle", BundleManifest(profile="tiny", units=units, weights_dir=str(weights),
                                                              target_shapes={"vdvae": [4]}), {"vdvae": ridge})
    out = tmp_path / "b.onnx"
    code, _ = run_cli(["export-unet", "--bundle", str(bundle), "--out", str(out), "--image-size", "32",
                       "--batch", "1"], capsys)
    assert code == 0
    assert read_metadata(out)["latent_hw"] == [4, 4] and read_metadata(out)["batch"] == 1


@pytest.mark.parametrize("extra, match", [
    (["--image-size", "60"], "multiple of 8"),
    (["--batch", "0"], "at least 1"),
    (["--text-share", "1.5"], "text-share"),
    (["--bundle", "/no/such/bundle"], "does not exist"),
    (["--profile", "paper", "--weights", "EMPTY"], "missing"),
])
def test_export_unet_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, match):
    extra = [str(tmp_path) if a == "EMPTY" else a for a in extra]
    code, captured = run_cli(["export-unet", "--out", str(tmp_path / "u.onnx")] + extra, capsys)
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in captured.err
    assert not (tmp_path / "u.onnx").exists()


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed here")
def test_export_unet_tensorrt_without_tensorrt_exits_2(weights, tmp_path, capsys):
    code, captured = run_cli(["export-unet", "--weights", str(weights), "--format", "tensorrt",
                              "--out", str(tmp_path / "u.plan")], capsys)
    assert code == 2 and len(captured.err.strip().splitlines()) == 1 and "TensorRT" in captured.err
    assert not os.listdir(tmp_path)


# ----- the refiner benchmark -----

def test_bench_refiner_backends_reports_ratios(weights, tmp_path):
    from spikevaediff.services.bench_refiner import bench_refiner_backends, format_refiner_backends

    result = bench_refiner_backends(ModelProfile("tiny", weights_dir=weights), steps=2, repeats=1,
                                    image_size=SIZE, image_repeats=1, onnx_options={"cache_dir": tmp_path})
    assert result["onnx_over_torch_ratio"] > 0
    assert result["unet_step"]["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    assert result["schedule"]["paper"]["unet_evaluations"] == 74
    assert result["schedule"]["reduced"]["unet_evaluations"] == 4
    assert result["reduced_over_paper_unet_evaluations_ratio"] == pytest.approx(4 / 74)
    assert 0 < result["reduced_over_paper_time_ratio"]
    assert -1 <= result["ssim_reduced_vs_paper"] <= 1 and -1 <= result["clip_cosine_reduced_vs_paper"] <= 1 + 1e-6
    assert result["image_max_abs_diff_onnx_vs_torch"] <= 1
    json.dumps(result)  # JSON-ready
    assert "onnx_over_torch_ratio" in format_refiner_backends(result)

"""paratime sample --pipeline DIR: a diffusers pipeline saved with save_pretrained (a tiny Stable Diffusion built from
configs, with an in-memory CLIP tokenizer so that a string prompt works), sampled through paratime.parallelize; the
PNGs equal the pipeline's own output."""

import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from paratime.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from paratime.bench.tiny_pipelines import tiny_sd

    folder = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    tiny_sd(text=True).save_pretrained(folder)
    return folder


def _own_images(folder, **call):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return [np.asarray(im).astype(int) for im in pipe(**call, generator=torch.Generator().manual_seed(3)).images]


def test_pipeline_pngs_equal_the_pipelines_own(saved_pipeline, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "cat.png"
    assert main(["sample", "--pipeline", str(saved_pipeline), "--prompt", "a cat", "--steps", "5", "--batch", "2",
                 "--height", "64", "--width", "64", "--guidance", "5", "--seed", "3", "--tol", "0",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "StableDiffusionPipeline" in printed and "sequential" in printed
    # The planned window's predicted speed-up beside the measured one, starred: the curve was assumed (CPU).
    assert re.search(r"picard W=\d+ .* \d+\.\d\d\* ", printed) and "\n* assumed latency-bound" in printed
    own = _own_images(saved_pipeline, prompt="a cat", num_inference_steps=5, num_images_per_prompt=2, height=64,
                      width=64, guidance_scale=5.0)
    for i, ref in enumerate(own):
        png = np.asarray(Image.open(tmp_path / f"cat-{i}.png")).astype(int)
        assert png.shape == ref.shape == (64, 64, 3)
        diff = np.abs(png - ref)
        # Equal up to float rounding: at most one 8-bit level, on a handful of the 12,288 values.
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    other = np.asarray(Image.open(tmp_path / "cat-1.png")).astype(int)
    assert np.abs(other - own[0]).max() > 1                   # the two images differ: not one image twice


@pytest.mark.parametrize("argv, flag", [
    (["--prompt", "a cat"], "--pipeline"),                                    # no model_index.json there
    ([], "--prompt"),
    (["--prompt", "a cat", "--label", "3"], "--label"),
    (["--prompt", "a cat", "--model", "gmm"], "--model"),
    (["--prompt", "a cat", "--solver", "ddpm"], "--solver"),
    (["--prompt", "a cat", "--height", "60"], "--height"),
    (["--prompt", "a cat", "--backend", "ray"], "--backend"),
    (["--prompt", "a cat", "--out", "/nonexistent-paratime-dir/x.png"], "--out"),
    (["--prompt", "a cat", "--out", "x.jpg"], "--out"),                       # it writes PNGs
    (["--prompt", "a cat", "--workers", "2"], "--workers"),                   # one device: was ignored
    (["--prompt", "a cat", "--method", "sequential", "--window", "2"], "--window"),     # was dropped silently
])
def test_pipeline_bad_inputs_are_one_line_errors(saved_pipeline, tmp_path, argv, flag, capsys):
    folder = str(tmp_path) if flag == "--pipeline" else str(saved_pipeline)
    assert main(["sample", "--pipeline", folder, *argv, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and flag in err, err


def test_steps_that_reach_past_the_last_training_timestep_are_named(saved_pipeline, capsys):
    """1000 steps of a 1000-timestep scheduler with steps_offset=1 reach t = 1000: an IndexError after the load,
    now an error naming --steps."""
    assert main(["sample", "--pipeline", str(saved_pipeline), "--prompt", "a cat", "--steps", "1000",
                 "--method", "sequential", "--no-progress", "--out", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("paratime: error: --steps: PNDMScheduler with 1000 steps reaches timestep 1000"), err


def test_prompt_without_pipeline_is_an_error(capsys):
    assert main(["sample", "--model", "gmm", "--prompt", "a cat"]) == 2
    assert "--prompt: applies only with --pipeline" in capsys.readouterr().err


def test_an_incomplete_pipeline_folder_is_a_one_line_error(saved_pipeline, tmp_path, capsys):
    import shutil

    folder = tmp_path / "no-unet"
    shutil.copytree(saved_pipeline, folder)
    shutil.rmtree(folder / "unet")                            # model_index.json names a unet the folder lacks
    assert main(["sample", "--pipeline", str(folder), "--prompt", "a cat", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines()[-1].startswith("paratime: error: --pipeline: cannot load"), err


@pytest.mark.parametrize("argv, flag", [
    (["--steps", "0"], "--steps"), (["--method", "bogus"], "--method"), (["--window", "0"], "--window"),
    (["--device", "bogus"], "--device"),
    (["--steps", "1001"], "--steps"),          # over num_train_timesteps: named scheduler options it never set
    (["--method", "parareal"], "--method"),    # PNDM's multistep scheduler: refused from its config, not the load
    (["--method", "parareal_pipelined"], "--method"),
])
def test_sampler_options_are_checked_before_the_pipeline_loads(saved_pipeline, tmp_path, argv, flag, capsys):
    """A folder whose weights are gone: an option's error (not the load's) shows the option was checked first (a
    typo no longer costs a model load, and --steps 0 / --device no longer end in a traceback)."""
    import shutil

    folder = tmp_path / "no-unet"
    shutil.copytree(saved_pipeline, folder)
    shutil.rmtree(folder / "unet")
    assert main(["sample", "--pipeline", str(folder), "--prompt", "a cat", *argv, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines()[-1].startswith(f"paratime: error: {flag}:"), err


def test_a_pipeline_that_is_not_text_to_image_is_named_before_the_load(saved_pipeline, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "img2img"
    shutil.copytree(saved_pipeline, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionImg2ImgPipeline"}))
    shutil.rmtree(folder / "unet")                            # a load would fail: the class is read first
    assert main(["sample", "--pipeline", str(folder), "--prompt", "a cat", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("paratime: error: --pipeline:") and "StableDiffusionImg2ImgPipeline" in err, err

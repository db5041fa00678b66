"""Mutation-found gaps in the kernel dispatcher (kernels/paratime_kernels/dispatch.py, reference.py) and in
SamplerConfig (paratime/config.py): the kernel equals its torch reference, refusals name the argument, an option
that does not apply is refused."""

import contextvars

import pytest
import torch

from paratime import ParallelSampler
from paratime.config import SamplerConfig
from paratime.kernels import kernel_mode, set_kernel_mode


def test_set_kernel_mode_refuses_an_unknown_mode_naming_the_argument():
    def run():
        with pytest.raises(ValueError, match="mode: unknown 'fast'"):
            set_kernel_mode("fast")
        return kernel_mode()

    assert contextvars.copy_context().run(run) == "auto"


def test_an_unknown_window_name_is_a_value_error_listing_the_allowed():
    with pytest.raises(ValueError, match="window: unknown 'fast'; allowed: 'auto'"):
        SamplerConfig(window="fast")


def test_an_unknown_spacing_is_refused_when_the_config_is_built():
    with pytest.raises(ValueError, match="spacing: unknown 'cosine'; allowed: "):
        SamplerConfig(spacing="cosine")


@pytest.mark.parametrize("workers, steps, cores", [(1, 10, 2), (4, 10, 4), (8, 5, 5)])
def test_staggered_auto_window_gets_one_core_per_device_between_2_and_steps(workers, steps, cores):
    assert SamplerConfig(method="staggered", steps=steps).for_devices(workers).window == cores


@pytest.mark.parametrize("steps, window, size", [(10, "auto", 10), (150, "auto", 100), (1000, "auto", 500),
                                                 (10, 50, 10), (10, 4, 4)])
def test_window_size_is_the_planners_widest_window_capped_at_steps(steps, window, size):
    assert SamplerConfig(steps=steps, window=window).window_size == size


def test_state_dtype_defaults_to_float32_on_cuda_and_float64_elsewhere_never_half():
    assert SamplerConfig().state_dtype_on(torch.device("cuda")) == torch.float32    # parsing needs no GPU
    assert SamplerConfig().state_dtype_on(torch.device("cpu")) == torch.float64
    assert SamplerConfig(state_dtype=torch.bfloat16).state_dtype_on(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("options, tol", [(dict(method="staggered"), 2e-3), (dict(method="auto"), 2e-3),
                                          (dict(method="auto", stop="paradigms"), 0.1),
                                          (dict(method="sequential"), 0.0), (dict(method="parareal"), 0.1)])
def test_tol_in_force_is_each_methods_default(options, tol):
    assert SamplerConfig(**options).tol_in_force == tol


# -- the kernel dispatcher -----------------------------------------------------------------------------------------
def test_non_contiguous_inputs_give_the_kernel_the_references_answer():
    """A transposed (non-contiguous) state, output or Picard increment is made contiguous before the launch: the
    kernels index rows by D, so a strided view would be read in the wrong order."""
    pytest.importorskip("triton")
    from paratime.kernels import fused_step, picard_update, record_launches
    from paratime.kernels.reference import fused_step_reference, picard_update_reference

    g = torch.Generator().manual_seed(0)
    x, o = (torch.randn(6, 4, generator=g).t() for _ in range(2))            # (4, 6), strided
    c = torch.randn(4, 4, generator=g)
    with record_launches() as seen:
        x0, dx = fused_step(x, o, c_x=c[0], c_o=c[1], k_d=c[2])
        start = torch.randn(5, 3, generator=g).t()                            # (3, 5)
        d, old = (torch.randn(5, 3, 2, generator=g).permute(2, 1, 0) for _ in range(2))   # (2, 3, 5)
        new, err = picard_update(start, d, old)
    assert {k.kernel for k in seen} == {"fused_step", "picard_update"}        # the kernels ran, not the reference
    r0, rdx = fused_step_reference(x.contiguous(), o.contiguous(), None, 1.0, c[0], c[1], c[2], None, None)
    torch.testing.assert_close((x0, dx), (r0, rdx), rtol=1e-6, atol=1e-6)
    rn, re_ = picard_update_reference(start.contiguous(), d.contiguous(), old.contiguous())
    torch.testing.assert_close((new, err), (rn, re_), rtol=1e-6, atol=1e-6)


def test_record_launches_names_the_variant_that_ran():
    pytest.importorskip("triton")
    from paratime.kernels import Launch, fused_step, picard_update, record_launches

    x = torch.ones(2, 8)
    c = torch.ones(2)
    with record_launches() as outer:
        with record_launches() as inner:
            fused_step(x, x, c_x=c, c_o=c, want_dx=False)
        picard_update(x, x[None], x[None], block=128)
        picard_update(x, x[None], x[None], block=1024)
    assert inner == {Launch("fused_step", torch.float32, torch.float32, x0=True)}
    assert outer == {Launch("picard_update", torch.float32, block=128),
                     Launch("picard_update", torch.float32, block=1024)}


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_both_paths_return_x0_dx_and_new_in_the_states_dtype(mode):
    if mode == "triton":
        pytest.importorskip("triton")
    from paratime.kernels import fused_step, kernels, picard_update

    x = torch.linspace(-1, 1, 16).reshape(2, 8).half()
    c = torch.tensor([0.5, 2.0])
    with kernels(mode):
        x0, dx = fused_step(x, x.flip(1), c_x=c, c_o=c, k_d=c)
    assert (x0.dtype, dx.dtype) == (torch.float16, torch.float16)
    torch.testing.assert_close(x0, (c[:, None] * (x.float() + x.flip(1).float())).half(), rtol=0, atol=0)
    with kernels(mode):
        new, _ = picard_update(x, x[None], x[None])
    assert new.dtype == torch.float16
    torch.testing.assert_close(new[0], 2 * x, rtol=0, atol=0)


def test_a_launch_on_a_cuda_tensor_makes_its_device_current():
    """launch_device on a tensor of cuda:1 is torch.cuda.device(1) (built, not entered: no GPU needed)."""
    from types import SimpleNamespace

    from paratime.kernels import launch_device

    ctx = launch_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1


def test_tensors_that_require_grad_take_the_kernel_under_no_grad():
    """Autograd records nothing under no_grad: the kernel runs (the reference is kept for recorded graphs)."""
    pytest.importorskip("triton")
    from paratime.kernels import fused_step, record_launches

    x = torch.ones(2, 8, requires_grad=True)
    c = torch.ones(2)
    with torch.no_grad(), record_launches() as seen:
        fused_step(x, x, c_x=c, c_o=c, want_dx=False)
    assert {k.kernel for k in seen} == {"fused_step"}


def test_float64_outputs_take_the_reference_no_kernel_variant_reads_them():
    from paratime.kernels import fused_step, record_launches

    x, c = torch.linspace(-1, 1, 16).reshape(2, 8), torch.tensor([0.5, 2.0])
    with record_launches() as seen:
        x0, _ = fused_step(x, x.double(), c_x=c, c_o=c, want_dx=False)
    assert not seen and x0.dtype == torch.float32
    assert torch.equal(x0, c[:, None] * x + c[:, None] * x)


@pytest.mark.parametrize("B, D, block", [(512, 1024, 1024), (511, 1024, 128), (256, 1025, 1024), (1, 16384, 128),
                                         (32, 16384, 1024)])
def test_picard_block_is_large_from_512_programs(B, D, block):
    from paratime.kernels.dispatch import picard_block

    assert picard_block(B, D) == block


def test_picard_tile_holds_at_least_one_point():
    from paratime.kernels.dispatch import picard_tile

    assert [picard_tile(b) for b in (128, 1024, 4096, 8192)] == [32, 4, 1, 1]


# -- SamplerConfig: derived configs --------------------------------------------------------------------------------
def test_for_model_resolves_units_to_data_and_fills_the_declared_scale():
    c = SamplerConfig().for_model(2.0)
    assert (c.tol_units, c.data_scale, c.tol_scale) == ("data", 2.0, 2.0)
    c = SamplerConfig(tol_units="absolute").for_model(2.0)            # absolute tolerances are not scaled
    assert (c.tol_units, c.data_scale, c.tol_scale) == ("absolute", None, 1.0)
    c = SamplerConfig(stop="paradigms")                               # noise-level units: nothing to resolve
    assert c.for_model(2.0) is c
    assert SamplerConfig(tol=0.1).tol_scale == 1.0                    # never resolved: tol stays absolute


def test_with_method_resets_the_options_the_new_method_does_not_read():
    c = SamplerConfig(steps=10, window=4, max_rounds=3, shared_window=True, tol_units="data", data_scale=2.0)
    p = c.with_method("parareal")
    assert (p.window, p.max_rounds, p.shared_window, p.tol_units, p.data_scale) == ("auto", None, False, None, None)
    assert SamplerConfig(steps=10, window=4, fill="copy").with_method("picard", window=10).fill == "path"
    assert SamplerConfig(steps=10, window=4, init="x0").with_method("picard", window=1).init == "auto"


def test_build_solver_wraps_the_corrector_with_its_steps():
    s = SamplerConfig(corrector_snr=0.1, corrector_steps=3).build_solver()
    assert (type(s).__name__, s.corrector_steps) == ("LangevinCorrected", 3)


def test_a_stochastic_sliding_window_draws_the_path_noise():
    c = SamplerConfig(solver="ddpm", steps=10, window=4)
    assert c.uses_noise_path(c.build_solver())                        # fill="path" on a sliding window
    c = SamplerConfig(solver="ddpm", steps=10, window=4, init="noise")
    assert c.uses_noise_path(c.build_solver())                        # ... also when the guess is not the path
    assert not SamplerConfig(solver="ddpm", steps=10, window=10).uses_noise_path(c.build_solver())


def test_check_memory_counts_guidance_from_the_config():
    cpu, f64 = torch.device("cpu"), torch.float64
    guided = SamplerConfig(guidance=3.0)
    assert guided.check_memory((1, 4), cpu, f64) == guided.check_memory((1, 4), cpu, f64, guided=True)
    assert guided.check_memory((1, 4), cpu, f64) > SamplerConfig().check_memory((1, 4), cpu, f64)


def test_numpy_integers_are_kept_as_python_ints():
    np = pytest.importorskip("numpy")
    c = SamplerConfig(steps=np.int64(10), window=np.int32(4))
    assert (type(c.steps), type(c.window)) == (int, int)


def test_meta_device_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="device: unsupported device type 'meta'"):
        SamplerConfig(device="meta")


def test_check_cond_refuses_a_non_dict_uncond_and_a_tensor_on_another_device_type():
    from paratime import Denoiser
    from paratime.config import check_cond

    den = Denoiser(torch.nn.Identity(), guidance=3.0)
    with pytest.raises(TypeError, match="uncond: expected a dict"):
        check_cond(den, {"uncond": torch.zeros(2)}, 2)
    class TakesY0(torch.nn.Module):     # a network whose forward names y0 (Identity takes no conditioning)
        def forward(self, x, t, y0=None):
            return x

    with pytest.raises(ValueError, match="^y0: on cpu but the sampler runs on cuda"):     # parsing needs no GPU
        check_cond(Denoiser(TakesY0()), {"y0": torch.zeros(2)}, 2, torch.device("cuda"))
    with pytest.raises(ValueError, match="^y0: not an argument of the network, which takes no conditioning"):
        check_cond(Denoiser(torch.nn.Identity()), {"y0": torch.zeros(2)}, 2, torch.device("cuda"))


# -- SamplerConfig: an option that does not apply is refused, naming it ----------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(method="sequential", tol_units="data"), "tol_units: applies only to the final-point rule .*'sequential' "
                                                  "takes no tol"),
    (dict(method="sequential", data_scale=2.0), "data_scale: applies only to the final-point rule"),
    (dict(stop="paradigms", tol_units="absolute"), "tol_units: applies only to the final-point rule .*noise-level"),
    (dict(stop="paradigms", data_scale=2.0), "data_scale: applies only to the final-point rule"),
    (dict(method="parareal", tol_units="data"), "tol_units: applies only to the final-point rule"),
    (dict(method="sequential", window=4), "window: applies only to method='picard' or 'staggered', not 'sequential'"),
    (dict(method="auto", max_rounds=3), "max_rounds: applies only to method='picard', not 'auto'"),
    (dict(method="sequential", tol=0.1), "tol: applies only to method='picard', 'auto', 'staggered', 'parareal' or "
                                         "'parareal_pipelined', not 'sequential'"),
    (dict(method="picard", coarse=lambda x, a, b: x), "coarse: applies only to method='parareal' or "
                                                      "'parareal_pipelined', not 'picard'"),
    (dict(method="staggered", stop="paradigms"), "stop: applies only to method='picard' or 'auto', not 'staggered'"),
    (dict(method="parareal", shared_window=True), "shared_window: applies only to method='picard' or 'auto'"),
])
def test_an_option_that_does_not_apply_is_refused_naming_it(options, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        SamplerConfig(**options)


@pytest.mark.parametrize("options, name", [
    (dict(method="sequential", update="secant"), "update"), (dict(method="sequential", window="auto"), "window"),
    (dict(method="parareal", stop="final"), "stop"), (dict(method="staggered", init="auto"), "init"),
    (dict(method="picard", coarse_steps=1), "coarse_steps"), (dict(method="sequential", shared_window=False),
                                                                 "shared_window"),
    (dict(method="staggered", fill="path"), "fill"),
])
def test_an_option_given_at_its_default_to_a_method_that_does_not_read_it_is_refused(options, name):
    # The constructor sees values only: the default passed unnoticed (method="sequential", update="secant" sampled
    # sequentially). from_options (ParallelSampler's entry check) knows what was given.
    assert SamplerConfig(**options).method == options["method"]
    with pytest.raises(ValueError, match=f"^{name}: applies only to method=.*given as"):
        SamplerConfig.from_options(**options)
    with pytest.raises(ValueError, match=f"^{name}: applies only to method="):
        ParallelSampler("gmm", **options)


@pytest.mark.parametrize("options", [dict(method="sequential", tol=None, window=None, max_rounds=None),
                                     dict(method="auto", window="auto"), dict(update="secant", window="auto"),
                                     dict(method="parareal", coarse_steps=1, slices=None)])
def test_an_option_left_as_none_or_read_by_the_method_is_taken(options):
    assert SamplerConfig.from_options(**options).method == options.get("method", "picard")


@pytest.mark.parametrize("window", [1, 50])
def test_fill_given_at_its_default_where_no_point_enters_the_window_is_refused(window):
    # README: fill= is refused on a window of the whole grid or of one point, at any value (fill="path" passed)
    refused = f"^fill: applies only to a sliding window .*window={window} .*given as 'path'"
    with pytest.raises(ValueError, match=refused):
        SamplerConfig.from_options(method="picard", window=window, steps=50, fill="path")
    assert SamplerConfig.from_options(method="picard", window=window, steps=50, fill=None).fill == "path"
    assert SamplerConfig.from_options(method="picard", window=8, steps=50, fill="path").fill == "path"


def test_coarse_steps_given_at_its_default_beside_a_coarse_callable_is_refused():
    # README: coarse_steps= with a coarse= callable is refused at any value (only a non-default one was)
    coarse = lambda x, a, b: x                                           # noqa: E731
    with pytest.raises(ValueError, match="^coarse_steps: applies only to the built-in .*given as 1"):
        SamplerConfig.from_options(method="parareal", coarse=coarse, coarse_steps=1)
    assert SamplerConfig.from_options(method="parareal", coarse=coarse, coarse_steps=None).coarse is coarse


def test_a_method_option_given_as_none_takes_its_default():
    # None is "not given" (README) for every method option, not only those whose default is None: update=None was
    # refused as an unknown update rule, shared_window=None as not a bool
    left = dict(update=None, stop=None, init=None, fill=None, shared_window=None, accept_tol=None, coarse_steps=None)
    assert SamplerConfig.from_options(method="sequential", **left).method == "sequential"
    cfg = SamplerConfig.from_options(method="picard", **left)
    assert (cfg.update, cfg.stop, cfg.init, cfg.fill, cfg.shared_window) == ("secant", "final", "auto", "path", False)
    with pytest.raises(ValueError, match="^update: unknown None"):      # the constructor sees values only
        SamplerConfig(update=None)
    with pytest.raises(ValueError, match="^method: unknown None"):      # not a method option: None is no method
        SamplerConfig.from_options(method=None)


@pytest.mark.parametrize("options", [dict(method="staggered", tol=0.1), dict(method="auto", tol=0.1, stop="paradigms",
                                                                             update="anderson", shared_window=True)])
def test_options_that_apply_are_taken(options):
    c = SamplerConfig(**options)
    assert all(getattr(c, k) == v for k, v in options.items())


@pytest.mark.parametrize("value", [0, -1.0])
def test_data_scale_must_be_positive(value):
    with pytest.raises(ValueError, match="^data_scale: "):
        SamplerConfig(data_scale=value)


@pytest.mark.parametrize("options, error, name", [
    (dict(dtype=torch.int32), TypeError, "dtype"), (dict(latent_scale=0.0), ValueError, "latent_scale"),
    (dict(clip_x0=0.0), ValueError, "clip_x0"), (dict(corrector_snr=0.0), ValueError, "corrector_snr"),
    (dict(guidance_rescale=1.5), ValueError, "guidance_rescale"), (dict(stop="magic"), ValueError, "stop"),
    (dict(accept_tol=-1.0), ValueError, "accept_tol"), (dict(guidance=-1.0), ValueError, "guidance"),
    (dict(classifier=3), TypeError, "classifier"), (dict(tol_units="meters"), ValueError, "tol_units"),
    (dict(corrector_snr=0.1, corrector_steps=0), ValueError, "corrector_steps"),
    (dict(method="parareal_pipelined", steps=4, slices=4, coarse_steps=2), ValueError, "coarse_steps"),
])
def test_out_of_range_options_are_refused_naming_them(options, error, name):
    with pytest.raises(error, match=f"^{name}: "):
        SamplerConfig(**options)


def test_the_device_is_parsed():
    assert SamplerConfig(device="cpu").device == torch.device("cpu")


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_half_outputs_with_number_coefficients_are_converted_in_float32(mode):
    """o = 1 (bf16) times 1/3: float32 arithmetic on both paths, not a bf16 product (0.333984375)."""
    if mode == "triton":
        pytest.importorskip("triton")
    from paratime.kernels import fused_step, kernels

    x, o = torch.zeros(2, 8), torch.ones(2, 8, dtype=torch.bfloat16)
    with kernels(mode):
        x0, _ = fused_step(x, o, c_x=1.0, c_o=1 / 3, want_dx=False)
    torch.testing.assert_close(x0, torch.full((2, 8), 1 / 3), rtol=0, atol=1e-7)


def test_picard_update_with_old_in_another_dtype_takes_the_reference():
    from paratime.kernels import picard_update, record_launches
    from paratime.kernels.reference import picard_update_reference

    start, d = torch.linspace(-1, 1, 16).reshape(2, 8), torch.linspace(0, 1, 48).reshape(3, 2, 8)
    old = d.half()
    with record_launches() as seen:
        new, err = picard_update(start, d, old)
    assert not seen
    rn, re_ = picard_update_reference(start, d, old)
    assert torch.equal(new, rn) and torch.equal(err, re_)

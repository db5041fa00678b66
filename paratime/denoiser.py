"""The model contract: every score model becomes one denoiser ``D(x, sigma, model_time, **cond) -> x0``.

Notation: ``x`` is the VE-frame state (``x = x0 + sigma * eps``, see :mod:`paratime.schedules`). The network sees

    x_in = a * x,   a = schedule.input_scale(sigma),   so   x_in = a * x0 + b * eps   with   b = a * sigma,

and its output is converted to the clean-sample prediction ``x0`` once, here, by the ``prediction`` type:

    x0     out is x0                                     x0 = out
    eps    out is eps                                    x0 = x - sigma * out
    v      out is v = (a eps - b x0) / c, c^2 = a^2+b^2  x0 = (a x_in - b c v) / c^2    (VP: v = alpha eps - sigma_t x0)
    score  out is grad log p(x_in) = -eps / b           x0 = (x_in + b^2 out) / a
    edm    out is EDM's raw F_theta                     x0 = c_skip x + c_out out
    flow   out is the rectified-flow velocity v = eps - x0 (dx_in/dt for x_in = (1-t) x0 + t eps)
                                                         x0 = (a x - b out) / (a + b)      (flow schedule: a + b = 1)

Solvers and parallel methods only ever see ``D``; they never branch on the parameterisation.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from paratime.kernels import fused_step

from .checks import check_number

from .schedules import EDMSchedule, NoiseSchedule, VESchedule

__all__ = ["Denoiser", "NetworkOutputs", "PREDICTIONS", "append_dims", "to_x0", "from_x0", "check_sample_shape",
           "cfg_active"]


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(M,) -> (M, 1, ..., 1)`` with ``ndim`` dimensions in all, to broadcast per-row coefficients."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _edm_scalings(sigma, sigma_data):
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out


def x0_coefficients(prediction: str, sigma, a, schedule: NoiseSchedule | None = None):
    """``(c_x, c_o)`` with ``x0 = c_x * x + c_o * out``: every prediction type is linear in ``x`` and the output.

    ``sigma`` and ``a`` may be ``(M,)`` or broadcast to ``x``'s shape; ``a`` may be None for the predictions that do
    not read it (:data:`SCALE_FREE`).
    """
    one = torch.ones_like(sigma)
    if prediction == "x0":
        return 0 * one, one
    if prediction == "eps":
        return one, -sigma
    if prediction == "edm":
        return _edm_scalings(sigma, schedule.sigma_data)
    b = a * sigma
    if prediction == "v":
        c = torch.sqrt(a * a + b * b)
        return a * a / (c * c), -b / c
    if prediction == "score":
        return one, b * b / a
    if prediction == "flow":
        return a / (a + b), -b / (a + b)
    raise ValueError(f"prediction: unknown {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


def to_x0(prediction: str, out, x, sigma, a, schedule: NoiseSchedule | None = None):
    """Convert a network output to ``x0``. ``sigma`` and ``a`` are already broadcast to ``x``'s shape."""
    c_x, c_o = x0_coefficients(prediction, sigma, a, schedule)
    return c_x * x + c_o * out


def from_x0(prediction: str, x0, x, sigma, a, schedule: NoiseSchedule | None = None):
    """Inverse of :func:`to_x0`: the output a perfect network of this ``prediction`` type would give."""
    c_x, c_o = x0_coefficients(prediction, sigma, a, schedule)
    return (x0 - c_x * x) / c_o


PREDICTIONS = ("eps", "x0", "v", "score", "edm", "flow")
#: predictions whose x0 coefficients do not depend on the input scale ``a``
SCALE_FREE = ("eps", "x0", "edm")


def _stack_halves(cond: dict, uncond: dict) -> dict:
    """Conditional and unconditional kwargs as one doubled batch, ``cat([cond, uncond])`` per tensor, recursing into
    nested dicts (SDXL's ``added_cond_kwargs``); a key missing on one side takes the other side's value."""
    both = {}
    for k in cond.keys() | uncond.keys():
        c, u = cond.get(k, uncond.get(k)), uncond.get(k, cond.get(k))
        if isinstance(c, dict):
            both[k] = _stack_halves(c, u)
        else:
            both[k] = torch.cat([c, u]) if isinstance(c, torch.Tensor) and c.ndim > 0 else c
    return both


def cfg_active(guidance: float | None) -> bool:
    """Whether a classifier-free guidance scale runs the doubled (conditional and unconditional) call: set and not 1
    (scale 1 is the conditional output alone)."""
    return guidance is not None and guidance != 1


def check_sample_shape(shape) -> tuple[int, ...] | None:
    """One sample's shape as a tuple of positive integers (a list accepted), or None.

    Raises:
        ValueError: naming ``sample_shape``.
    """
    if shape is None:
        return None
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"sample_shape: expected positive integers (one sample's shape) or None, got {shape!r}")
    return tuple(shape)


@dataclass(frozen=True)
class NetworkOutputs:
    """Raw outputs of rows and the map to their ``D``: ``D = c_x x + c_o o``, ``o = u + g (c - u)`` (``o = c``
    without guidance). What a fused step reads instead of ``D`` (:meth:`Denoiser.network_outputs`).

    Attributes:
        out: ``(M, *shape)`` the (conditional) output, network dtype. uncond: the unconditional one, or None.
        guidance: g. c_x, c_o: ``(M,)`` per-row coefficients in the state dtype.
    """

    out: torch.Tensor
    uncond: torch.Tensor | None
    guidance: float
    c_x: torch.Tensor
    c_o: torch.Tensor


@dataclass(frozen=True, eq=False)
class Denoiser:
    """A score network adapted to ``D(x, sigma, model_time, **cond) -> x0`` (VE frame, rows batched).

    Args:
        network: ``network(x_in, model_time, **cond) -> output``; ``x_in`` is ``(M, *shape)``, ``model_time``
            is ``(M,)`` float32. A ``torch.nn.Module`` or any callable.
        schedule: the noise schedule the network was trained with (its grid, input scaling and conditioning).
        prediction: what the network outputs: ``eps``, ``x0``, ``v``, ``score``, ``edm`` or ``flow`` (the
            rectified-flow velocity ``eps - x0``, with :class:`~paratime.schedules.FlowSchedule`).
        dtype: dtype the network runs in (inputs are cast to it; outputs come back in the state dtype).
            ``None`` keeps the state dtype for callables and the parameters' dtype for modules.
        clip_x0: clamp the x0 prediction to ``[-clip_x0, clip_x0]`` (diffusers' ``clip_sample``); None: off.
        sample_shape: the per-sample shape the network expects, if known (used for defaults and checks).
        guidance: classifier-free guidance scale g: ``o = u + g (c - u)`` on the network outputs, the conditional
            and unconditional halves evaluated in one doubled batch. None or 1: off.
        guidance_rescale: phi of Lin et al. (2023): rescale the guided output's std to the conditional one's.
        uncond_fn: builds the unconditional kwargs from the conditional ones when ``uncond`` is not passed
            (e.g. the digits model's "no label" class). Negative conditioning: pass ``uncond={...}``.
        classifier: ``classifier(x_in, model_time) -> logits`` of a noise-conditional classifier; adds
            ``classifier_scale * grad log p(y | x)`` to the score, i.e. ``x0 += scale * sigma^2 * grad`` (VE frame),
            for labels given as ``y``.
        classifier_scale: s, the classifier guidance scale.

    Raises:
        ValueError: unknown ``prediction``, ``edm`` without an :class:`EDMSchedule`, bad ``clip_x0``.
        TypeError: ``network`` is not callable or ``schedule`` is not a :class:`NoiseSchedule`.
    """

    network: Callable[..., torch.Tensor]
    schedule: NoiseSchedule = field(default_factory=VESchedule)
    prediction: str = "eps"
    dtype: torch.dtype | None = None
    clip_x0: float | None = None
    sample_shape: tuple[int, ...] | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    uncond_fn: Callable[[dict], dict] | None = None
    classifier: Callable[..., torch.Tensor] | None = None
    classifier_scale: float = 0.0

    def __post_init__(self):
        if not callable(self.network):
            raise TypeError(f"network: expected a callable, got {type(self.network).__name__}")
        if not isinstance(self.schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(self.schedule).__name__}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: unknown {self.prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        if self.prediction == "edm" and not isinstance(self.schedule, EDMSchedule):
            raise ValueError("prediction: 'edm' needs schedule=EDMSchedule(...)")
        check_number("clip_x0", self.clip_x0, 0, low_open=True, none=True)
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {self.dtype!r}")
        if self.guidance is not None and (not isinstance(self.guidance, numbers.Real) or isinstance(self.guidance, bool)
                                          or not 0 <= self.guidance < float("inf")):     # NaN fails the range too
            raise ValueError(f"guidance: must be a finite number >= 0 or None, got {self.guidance!r}")
        check_number("guidance_rescale", self.guidance_rescale, 0, 1)
        if self.guidance_rescale and not self.guided:
            raise ValueError("guidance_rescale: applies only with classifier-free guidance; give guidance= too (other "
                             "than 1, which is the conditional output alone)")
        if self.uncond_fn is not None and not callable(self.uncond_fn):
            raise TypeError(f"uncond_fn: expected a callable uncond_fn(cond) -> dict, got "
                            f"{type(self.uncond_fn).__name__}")
        if self.classifier is not None and not callable(self.classifier):
            raise TypeError(f"classifier: expected a callable, got {type(self.classifier).__name__}")
        check_number("classifier_scale", self.classifier_scale, 0)
        if self.classifier_scale and self.classifier is None:
            raise ValueError("classifier_scale: given without classifier=")
        if self.classifier is not None and not self.classifier_scale:
            raise ValueError("classifier: applies only with classifier_scale > 0; give classifier_scale= too")
        object.__setattr__(self, "sample_shape", check_sample_shape(self.sample_shape))

    @classmethod
    def from_callable(cls, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], **kw) -> "Denoiser":
        """Wrap a plain ``fn(x, sigma) -> x0`` in the VE frame (k-diffusion's denoiser form)."""
        kw.setdefault("schedule", VESchedule(1e-3, 80.0))
        kw.setdefault("prediction", "x0")
        if not isinstance(kw["schedule"], VESchedule):   # only VE feeds the network x itself and sigma as its time
            raise ValueError(f"schedule: from_callable wraps fn(x, sigma), which needs a VESchedule (the network "
                             f"sees x and sigma); got {type(kw['schedule']).__name__}, whose network input and time "
                             f"are not x and sigma: use Denoiser(network, schedule, prediction) instead")
        return cls(fn, **kw)

    @property
    def network_dtype(self) -> torch.dtype | None:
        if self.dtype is not None:
            return self.dtype
        if isinstance(self.network, torch.nn.Module):
            p = next(self.network.parameters(), None)
            return p.dtype if p is not None else None
        return None

    def run_network(self, x: torch.Tensor, sigma: torch.Tensor, model_time: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The raw network output for VE-frame rows ``x`` (input scaled, cast to the network dtype)."""
        a = append_dims(self.schedule.input_scale(sigma), x.ndim)
        net_dtype = self.network_dtype or x.dtype
        out = self.network((a * x).to(net_dtype), model_time.to(torch.float32), **cond)
        if not isinstance(out, torch.Tensor):  # diffusers returns an output dataclass, or a tuple (return_dict=False)
            try:
                out = out.sample if hasattr(out, "sample") else out[0]
            except (TypeError, KeyError, IndexError):
                pass
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"network: expected a tensor (or diffusers' output with .sample, or a tuple whose first "
                            f"entry is one), got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"network: output shape {tuple(out.shape)} differs from input shape {tuple(x.shape)}")
        return out

    def x0_coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_x, c_o)``, shaped like ``sigma``: ``x0 = c_x x + c_o o`` for the (guided) network output ``o``."""
        a = None if self.prediction in SCALE_FREE else self.schedule.input_scale(sigma)
        return x0_coefficients(self.prediction, sigma, a, self.schedule)

    def to_x0(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor, out_uncond: torch.Tensor | None = None,
              guidance: float = 1.0, clip: bool = True) -> torch.Tensor:
        """``x0`` from network outputs (guided when ``out_uncond`` is given), one fused pass (kernels.fused_step)."""
        c_x, c_o = self.x0_coefficients(sigma)
        unc = None if out_uncond is None else out_uncond.to(x.dtype)
        x0, _ = fused_step(x, out.to(x.dtype), unc, guidance, c_x, c_o, want_dx=False)
        if clip and self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return x0

    @property
    def guided(self) -> bool:
        return cfg_active(self.guidance)

    @property
    def classified(self) -> bool:
        """Whether classifier guidance runs (a classifier comes with a scale > 0: the constructor refuses either
        alone)."""
        return self.classifier is not None

    @property
    def fusable(self) -> bool:
        """Whether ``D`` is ``c_x x + c_o (u + g (c - u))`` of the raw outputs alone, so a linear step can take
        guidance, conversion and increment in one pass from :meth:`network_outputs` (not with ``clip_x0``,
        ``guidance_rescale`` or a classifier, which act between the outputs and ``D``)."""
        return self.clip_x0 is None and not self.guidance_rescale and not self.classified

    def network_outputs(self, x: torch.Tensor, sigma: torch.Tensor, model_time: torch.Tensor,
                        uncond: dict | None = None, y: torch.Tensor | None = None,
                        **cond: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The raw outputs in the network's dtype: ``(out, None)``, or under classifier-free guidance the
        conditional and unconditional halves ``(c, u)`` of one doubled batch; ``D`` is their :meth:`to_x0`.
        Takes the arguments of :meth:`__call__` (``y``, the classifier's labels, is not the network's)."""
        if not self.guided:
            return self.run_network(x, sigma, model_time, **cond), None
        c, u = self._doubled(x, sigma, model_time, uncond, cond).chunk(2)
        return c, u

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_time: torch.Tensor,
                 uncond: dict | None = None, y: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        """Args: ``x`` ``(M, *shape)``, ``sigma`` and ``model_time`` ``(M,)``; ``uncond``: unconditional kwargs
        for guidance; ``y``: class labels for classifier guidance. Returns ``x0``, ``(M, *shape)``.

        Raises:
            ValueError: ``sigma`` or ``model_time`` not one entry per row of ``x``."""
        for name, v in (("sigma", sigma), ("model_time", model_time)):
            if not isinstance(v, torch.Tensor) or v.shape != x.shape[:1]:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{name}: expected one entry per row of x, shape ({x.shape[0]},), got {got}")
        if not self.guided:
            x0 = self.to_x0(x, sigma, self.run_network(x, sigma, model_time, **cond), clip=False)
        else:
            x0 = self._cfg(x, sigma, model_time, uncond, cond)
        if self.classified:
            if y is None:
                raise ValueError("y: classifier guidance needs the class labels as y=")
            if y.shape != (x.shape[0],):        # gather read the first len(y) rows and guided no other
                raise ValueError(f"y: expected one label per row, shape ({x.shape[0]},), got {tuple(y.shape)}")
            x0 = x0 + self.classifier_scale * append_dims(sigma, x.ndim) ** 2 * self._log_prob_grad(x, sigma,
                                                                                                     model_time, y)
        if self.clip_x0 is not None:            # the final x0, the classifier's term included
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return x0

    def _doubled(self, x, sigma, model_time, uncond, cond):
        # Conditional and unconditional halves in one doubled batch (ParaDiGMS doubles the window the same way).
        if uncond is None:
            if self.uncond_fn is None:
                raise ValueError("uncond: classifier-free guidance needs unconditional inputs: pass uncond={...} "
                                 "or give the model an uncond_fn")
            uncond = self.uncond_fn(cond)
        both = _stack_halves(cond, uncond)
        return self.run_network(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([model_time, model_time]),
                                **both)

    def _cfg(self, x, sigma, model_time, uncond, cond):
        """The guided ``x0``, before ``clip_x0`` (:meth:`__call__` clips)."""
        c, u = self._doubled(x, sigma, model_time, uncond, cond).to(x.dtype).chunk(2)
        if not self.guidance_rescale:
            return self.to_x0(x, sigma, c, u, self.guidance, clip=False)
        guided = u + self.guidance * (c - u)
        dims = tuple(range(1, x.ndim))
        ratio = c.std(dims, keepdim=True) / guided.std(dims, keepdim=True)
        del c, u                                # the doubled output: freed before the rescale
        # phi (guided * ratio) + (1 - phi) guided (Lin et al.; diffusers' rescale_noise_cfg) as one per-row factor,
        # in place: no window-sized temporaries beyond `guided` (three more took the round above its memory bound);
        # out of place where autograd records it (the likelihood's divergence: std's backward reads `guided`).
        factor = self.guidance_rescale * ratio + (1 - self.guidance_rescale)
        return self.to_x0(x, sigma, guided * factor if guided.requires_grad else guided.mul_(factor), clip=False)

    def _classifier_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The classifier's input dtype: its own parameters' (a module), else the state's (an fp16 network with an
        fp32 classifier, or the reverse, failed on the network's dtype)."""
        if isinstance(self.classifier, torch.nn.Module):
            p = next(self.classifier.parameters(), None)
            if p is not None and p.is_floating_point():
                return p.dtype
        return x.dtype

    def _log_prob_grad(self, x, sigma, model_time, y):
        """grad_x log p(y | x) of the classifier, in the VE frame (autograd inside the batched call). Where ``x``
        itself requires grad (the likelihood's divergence differentiates ``D``), the gradient keeps its graph, so
        ``dD/dx`` holds the classifier term's Hessian too."""
        a = append_dims(self.schedule.input_scale(sigma), x.ndim)
        track = x.requires_grad
        with torch.enable_grad(), torch.inference_mode(False):
            xg = x if track else x.detach().clone().requires_grad_(True)
            logits = self.classifier((a * xg).to(self._classifier_dtype(x)), model_time.to(torch.float32))
            # At least float32 (a half-precision classifier's log-softmax), a float64 one kept at its precision.
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            logp = torch.log_softmax(logits, dim=-1).gather(1, y.long().reshape(-1, 1)).sum()
            (grad,) = torch.autograd.grad(logp, xg, create_graph=track)
        return grad.to(x.dtype)

"""Flow-matching Euler schedule of LongCat-Video's video continuation (SPEC 7).

Everything here is plain torch on CPU tensors (the schedule is a handful of floats); the
denoising loop moves what it needs to its device.

Schedules (``mode``):

* ``"plain"``: base sigmas ``linspace(1, 0.001, N)``, shifted by
  ``s' = shift * s / (1 + (shift - 1) * s)``; timesteps ``1000 * s'``.
* ``"enhance_hf"`` (basic VC default): the plain timesteps above 500 are kept, then 10 uniform
  timesteps ``linspace(500, 0, 10, endpoint=False)`` are appended; sigmas are ``t / 1000``.
  With shift 12, 50 requested steps become 56.

The numbers above are for ``num_train_timesteps = 1000`` (upstream's, and the only value the
pipeline accepts: the DiT takes timesteps in [0, 1000]); ``vc_timesteps`` scales every one of them
with ``num_train_timesteps`` (timesteps ``N * s'``, the enhance_hf tail from ``N / 2``, sigmas
``t / N``), and its distill grid needs ``N`` a multiple of 50.
* ``"distill"`` (cfg-step LoRA): 50 distill indices ``round(arange(1, 51) * 20)``; the
  ``floor(linspace(0, 50, N, endpoint=False))``-th of them in descending order, divided by 1000,
  then shifted. With shift 12 and N = 16 the last timestep is ~510.6.

Every schedule ends with a final sigma 0 (``len(sigmas) == len(timesteps) + 1``).

Not diffusers' ``FlowMatchEulerDiscreteScheduler``: given our base sigmas it yields the same plain
and distill schedules bit for bit (tests/vc/test_schedule_vs_diffusers.py), but it shifts every
sigma it is given, so enhance_hf's unshifted tail cannot be expressed, and its ``step`` casts the
latents back to the prediction's dtype (bf16) where SPEC 7 keeps them in fp32.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Tuple

import numpy as np
import torch

__all__ = [
    "SCHEDULE_MODES",
    "vc_timesteps",
    "shift_sigmas",
    "read_scheduler_config",
    "check_scheduler_config",
    "check_num_train_timesteps",
    "check_distill_steps",
    "check_shift",
    "euler_step",
    "cfg_zero",
]

SCHEDULE_MODES = ("enhance_hf", "distill", "plain")

# Upstream constants (LongCat-Video pipeline): training timesteps, distill grid, enhance_hf tail.
NUM_TRAIN_TIMESTEPS = 1000
NUM_DISTILL_SAMPLE_STEPS = 50
ENHANCE_HF_START_FRACTION = 0.5  # of num_train_timesteps: 500 upstream
ENHANCE_HF_TAIL_STEPS = 10


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow-matching time shift ``s' = shift * s / (1 + (shift - 1) * s)`` in fp32."""
    sigmas = sigmas.to(torch.float32)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _base_sigmas(num_steps: int, mode: str, num_train_timesteps: int) -> torch.Tensor:
    if mode == "distill":
        stride = num_train_timesteps // NUM_DISTILL_SAMPLE_STEPS
        indices = torch.round(
            torch.arange(1, NUM_DISTILL_SAMPLE_STEPS + 1, dtype=torch.float32) * stride
        ).long()
        # numpy's float64 linspace then floor, exactly as upstream picks them.
        pick = np.floor(np.linspace(0, NUM_DISTILL_SAMPLE_STEPS, num=num_steps, endpoint=False))
        pick = torch.from_numpy(pick.astype(np.int64))
        return torch.flip(indices, [0])[pick].to(torch.float32) / num_train_timesteps
    return torch.linspace(1.0, 0.001, num_steps, dtype=torch.float32)


def vc_timesteps(
    num_steps: int,
    shift: float,
    mode: str,
    *,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Timesteps and sigmas of the VC sampler.

    Args:
        num_steps (int): requested number of steps (``enhance_hf`` may return more, see module doc).
            For ``"distill"`` at most 50 (the distill grid has 50 points).
        shift (float): flow-matching shift from ``scheduler/scheduler_config.json`` (12 upstream).
        mode (str): ``"enhance_hf"``, ``"distill"`` or ``"plain"``.
        num_train_timesteps (int): 1000 upstream; a positive int (a multiple of 50 for ``"distill"``).

    Returns:
        (timesteps, sigmas): ``timesteps [N']`` fp32 in ``(0, num_train_timesteps]``, strictly decreasing, fed to
        the DiT; ``sigmas [N'+1]`` fp32, ``sigmas[i]`` the noise level at step ``i`` and a final 0.
    """
    if mode not in SCHEDULE_MODES:
        raise ValueError(f"vc_timesteps: mode must be one of {SCHEDULE_MODES}, got {mode!r}")
    num_train_timesteps = check_num_train_timesteps(num_train_timesteps, "vc_timesteps: num_train_timesteps")
    if mode == "distill" and num_train_timesteps % NUM_DISTILL_SAMPLE_STEPS:
        # the grid's stride num_train_timesteps // 50 would floor: sigmas not starting at 1 (0 below 50)
        raise ValueError(
            f"vc_timesteps: distill mode needs num_train_timesteps a multiple of {NUM_DISTILL_SAMPLE_STEPS} "
            f"(its grid has {NUM_DISTILL_SAMPLE_STEPS} points), got {num_train_timesteps}"
        )
    # a numpy int was refused as "must be an int, got int64" (check_num_train_timesteps takes it)
    if isinstance(num_steps, (bool, np.bool_)) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"vc_timesteps: num_steps must be an int, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"vc_timesteps: num_steps must be >= 1, got {num_steps}")
    num_steps = int(num_steps)
    if mode == "distill":
        check_distill_steps(num_steps, "vc_timesteps: num_steps")
    shift = check_shift(shift, "vc_timesteps: shift")

    sigmas = shift_sigmas(_base_sigmas(num_steps, mode, num_train_timesteps), shift)
    timesteps = sigmas * num_train_timesteps
    if mode == "enhance_hf":
        start = ENHANCE_HF_START_FRACTION * num_train_timesteps
        kept = timesteps[timesteps > start]
        tail = torch.linspace(start, 0.0, ENHANCE_HF_TAIL_STEPS + 1, dtype=torch.float64)[:-1]
        timesteps = torch.cat([kept, tail.to(torch.float32)])
        sigmas = timesteps / num_train_timesteps
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])
    return timesteps, sigmas


def check_shift(shift, name: str = "shift") -> float:
    """``shift`` as a float if it is a positive finite real number (not a bool, not a string) whose fp32
    shift of the base sigmas stays finite and positive; TypeError / ValueError naming ``name`` otherwise.

    The shift is computed in fp32 (SPEC 7): past about 3e38 ``shift * s`` overflows and below about 6e-8
    ``1 + (shift - 1) * s`` rounds to 0 at ``s = 1``, giving NaN or infinite sigmas (below about 1e-4 the
    first sigma is already off 1 by more than 0.1%: 0.84 at 1e-7); enhance_hf then
    dropped the NaN timesteps without a word (NaN > 500 is false), so the sampler started from pure
    noise at timestep 500 and returned a half-noisy video.
    """
    if isinstance(shift, (bool, np.bool_)) or not isinstance(shift, numbers.Real):
        raise TypeError(f"{name} must be a positive finite number, got {type(shift).__name__} {shift!r}")
    value = float(shift)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {shift!r}")
    # the ends of every schedule's base sigmas (1 and plain's 0.001; distill's are in [0.02, 1])
    probe = shift_sigmas(torch.tensor([1.0, 0.001]), value)
    if not bool(torch.isfinite(probe).all()) or not bool((probe > 0).all()) or abs(float(probe[0]) - 1.0) > 1e-3:
        raise ValueError(
            f"{name}={shift!r} gives wrong sigmas in fp32 ({probe.tolist()} for base sigmas 1 and 0.001, expected "
            "1 and a positive number); use a shift between 1e-4 and 1e38 (LongCat-Video's is 12)"
        )
    return value


def check_distill_steps(num_steps: int, name: str = "num_steps") -> None:
    """Distill mode picks its steps from a grid of 50 points: more is a ValueError naming ``name``."""
    if num_steps > NUM_DISTILL_SAMPLE_STEPS:
        raise ValueError(
            f"{name}: distill mode supports at most {NUM_DISTILL_SAMPLE_STEPS} steps (its grid has "
            f"{NUM_DISTILL_SAMPLE_STEPS} points), got {num_steps}"
        )


def check_num_train_timesteps(value, name: str = "num_train_timesteps") -> int:
    """``value`` as an int if it is a positive int (a bool, a float or a string is an error naming ``name``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


# FlowMatchEulerDiscreteScheduler fields that, when truthy, change its sigmas (shift_terminal, invert_sigmas,
# karras / exponential / beta sigmas) or its step (stochastic_sampling).
_SCHEDULE_CHANGING_FIELDS = ("shift_terminal", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                             "use_beta_sigmas", "stochastic_sampling")


def check_scheduler_config(cfg: dict, where: str = "scheduler_config") -> dict:
    """The fields the pipeline uses, checked; ``where`` (the file, or the argument) names the source.

    ``shift``: a positive number (default 1.0 as in diffusers). ``num_train_timesteps``: 1000
    (default 1000): the LongCat-Video DiT takes timesteps in [0, 1000] (its training, the distill
    grid, the enhance_hf tail and the refinement's ``t_thresh`` are on that scale), so any other
    value cannot be honoured (10 gave all-zero distill timesteps: the output was the initial noise;
    0 gave NaN sigmas). ``use_dynamic_shifting``: false. ``shift_terminal``, ``invert_sigmas``,
    ``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``, ``stochastic_sampling``:
    absent, null or false (diffusers would change the sigmas or the step; a ValueError, not ignored).
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    shift = cfg.get("shift", 1.0)
    # numbers.Real as check_shift: a dict passed in with np.float32(12.0) was refused as "must be a positive
    # number, got np.float32(12.0)"
    if isinstance(shift, (bool, np.bool_)) or not isinstance(shift, numbers.Real) \
            or not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"{where}: 'shift' must be a positive number, got {shift!r}")
    check_shift(shift, f"{where}: 'shift'")
    ntt = cfg.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)
    if isinstance(ntt, bool) or not isinstance(ntt, (int, np.integer)) or ntt != NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"{where}: 'num_train_timesteps' must be {NUM_TRAIN_TIMESTEPS} (the LongCat-Video DiT takes timesteps in "
            f"[0, {NUM_TRAIN_TIMESTEPS}]), got {ntt!r}"
        )
    if cfg.get("use_dynamic_shifting", False):
        raise ValueError(f"{where}: use_dynamic_shifting=true is not used by LongCat-Video VC and not supported")
    for key in _SCHEDULE_CHANGING_FIELDS:
        # diffusers' scheduler (upstream's) applies these when truthy; the SPEC 7 schedule here does not
        if cfg.get(key):
            raise ValueError(
                f"{where}: {key}={cfg[key]!r} changes diffusers' sigmas or step, which LongCat-Video VC does not use "
                f"(SPEC 7 schedule); not supported: set it to {'null' if key == 'shift_terminal' else 'false'}"
            )
    return cfg


def read_scheduler_config(path: str) -> dict:
    """Read ``scheduler_config.json`` (a file or its folder) and return the dict.

    Only ``shift`` (default 1.0 as in diffusers) and ``num_train_timesteps`` (default 1000) are used.
    Raises ``FileNotFoundError`` naming the file, ``ValueError`` for bad JSON or a bad field
    (``check_scheduler_config``).
    """
    if os.path.isdir(path) or not path.endswith(".json"):
        path = os.path.join(path, "scheduler_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scheduler config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return check_scheduler_config(cfg, path)


def euler_step(
    sample: torch.Tensor, prediction: torch.Tensor, sigma: float, sigma_next: float
) -> torch.Tensor:
    """One Euler step in fp32: ``x + (sigma_next - sigma) * v`` with ``v = -prediction``.

    The DiT predicts the negated velocity (SPEC 7); the result is fp32.
    """
    return sample.to(torch.float32) - (float(sigma_next) - float(sigma)) * prediction.to(torch.float32)


def cfg_zero(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG-zero guidance: ``uncond * st + g * (cond - uncond * st)`` with the per-sample
    ``st = <cond, uncond> / (||uncond||^2 + 1e-8)`` over the flattened prediction.

    Args:
        uncond, cond (Tensor): ``[B, ...]`` predictions of the same shape (fp32 in the pipeline).
        guidance_scale (float): g.

    Returns:
        Tensor: ``[B, ...]`` in the inputs' dtype, computed in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: ``uncond`` and ``cond`` differ in shape (they broadcast to a wrong result otherwise).
    """
    if uncond.shape != cond.shape and not torch.compiler.is_compiling():
        # [2, 1, 4] against [2, 4] broadcast to a [2, 2, 4] result without a word
        raise ValueError(
            f"cfg_zero: uncond and cond must have the same shape, got {list(uncond.shape)} and {list(cond.shape)}"
        )
    b = cond.shape[0]
    out_dtype = torch.result_type(uncond, cond)
    # fp32 at least: in fp16 the per-sample sums overflowed (st = inf/inf = NaN); one rounding at the end
    acc = torch.promote_types(out_dtype, torch.float32)
    u, c = uncond.to(acc), cond.to(acc)
    pos = c.reshape(b, -1)
    neg = u.reshape(b, -1)
    st = (pos * neg).sum(dim=1, keepdim=True) / ((neg * neg).sum(dim=1, keepdim=True) + 1e-8)
    st = st.view((b,) + (1,) * (cond.dim() - 1))
    return (u * st + guidance_scale * (c - u * st)).to(out_dtype)

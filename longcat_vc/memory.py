"""Memory modes of the VC pipeline: DiT blocks streamed from pinned CPU memory, the text encoder
on the accelerator only while it encodes, the KV cache offloaded (issue 17).

Modes (``VideoContinuationPipeline.from_pretrained(..., memory=...)``, CLI ``--memory``)::

    resident  everything on the accelerator (fastest; 480p 93 frames needs ~45 GiB)
    balanced  DiT blocks streamed one block ahead of the compute (``BlockStreamer``), the text
              encoder streamed leaf by leaf while it encodes, KV cache resident
    low       balanced + the KV cache in pinned CPU memory, streamed one block ahead

Every mode computes with the same weights in the same order, so results equal ``resident`` bit
for bit (tested on CPU; on CUDA the copies run on side streams and the compute stream waits for
them, which changes no arithmetic). VAE tiling changes the decoded pixels, so it is not part of a
mode: ``vae_tiling=True`` (``--vae-tiling``) turns it on separately.

Why our own block streamer for the DiT and diffusers' ``apply_group_offloading`` for the text
encoder: group offloading onloads the modules outside ``blocks`` from a hook on the root
``forward``, but ``LongCatDiT.build_kv_cache`` calls the embedders and ``block.forward_kv_only``
directly (no root forward, no block ``forward``), so the cache build would run on offloaded
weights; and LoRA adapters live in plain attributes of ``LoRALinear`` (not parameters or buffers,
to keep the upstream state dict), which group offloading does not move. The streamer here hooks
``blocks[i]`` (forward pre/post hooks, plus a wrapper of ``forward_kv_only``), keeps the small
non-block modules resident, streams the active LoRA tensors with the block and re-reads the
CPU weights when they changed (``fuse_lora`` writes the fused weights into the CPU copies). The
UMT5 encoder is a plain ``nn.Module`` called through ``forward``: group offloading fits it.

Only on a GPU can one check that copies overlap compute and that peak memory follows the
estimate (``bench/memory_modes_gpu.py``); CPU tests check order, freeing and exactness.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from longcat_kernels._validate import check_bool, plain_int

from .kv_cache import tensor_stamp, tensor_version

__all__ = [
    "MEMORY_MODES",
    "MemoryPlan",
    "MemoryModeError",
    "BlockStreamer",
    "memory_plan",
    "estimate_peak_bytes",
    "dit_param_counts",
    "check_memory_fits",
    "device_bytes",
    "usable_bytes",
    "apply_memory_mode",
    "offload_text_encoder",
]

MEMORY_MODES = ("resident", "balanced", "low")
GiB = float(2**30)


class MemoryModeError(ValueError):
    """A memory mode does not fit the accelerator; the message names what it needs and which mode fits."""


@dataclass(frozen=True)
class MemoryPlan:
    """What a mode does.

    Attributes:
        name: the mode.
        stream_dit_blocks: DiT blocks live in pinned CPU memory and are copied in one block ahead.
        stream_text_encoder: the text encoder lives in CPU memory and is streamed while it encodes.
        offload_kv_cache: the KV cache lives in pinned CPU memory (``build_kv_cache(offload=True)``).
    """

    name: str
    stream_dit_blocks: bool
    stream_text_encoder: bool
    offload_kv_cache: bool


_PLANS = {
    "resident": MemoryPlan("resident", False, False, False),
    "balanced": MemoryPlan("balanced", True, True, False),
    "low": MemoryPlan("low", True, True, True),
}


def memory_plan(mode: str) -> MemoryPlan:
    """The ``MemoryPlan`` of ``mode`` (one of ``MEMORY_MODES``); ValueError naming the choices."""
    if not isinstance(mode, str) or mode not in _PLANS:
        raise ValueError(f"memory: expected one of {MEMORY_MODES}, got {mode!r}")
    return _PLANS[mode]


# ============================================================================ block streamer
def _lora_tensors(block: nn.Module, *, loaded: bool = False) -> List[Tuple[Any, str, torch.Tensor]]:
    """``(owner, attribute, tensor)`` of every LoRA tensor the block's forward reads: the ``down``
    and ``up`` matrices of the active, unfused adapters (fused ones are inside the weights).
    ``loaded``: of every loaded adapter instead (attach/detach move them all)."""
    from .lora import LoRALinear

    out: List[Tuple[Any, str, torch.Tensor]] = []
    for m in block.modules():
        if not isinstance(m, LoRALinear):
            continue
        if loaded:
            adapters = list(m.lora_adapters.values())
        elif m.lora_active and not m.lora_fused:
            adapters = m.lora_active
        else:
            adapters = []
        for a in adapters:
            out.append((a, "down", a.down))
            for p in a.parts:
                out.append((p, "up", p.up))
    return out


def _move(owner: Any, attr: str, t: torch.Tensor) -> None:
    """Points a LoRA tensor attribute at another copy of the same values (pinned home, device
    copy). ``object.__setattr__``: ``LoRAAdapter.__setattr__`` counts a user's replacement of
    ``down`` as a model state change (stale KV caches); the streamer's moves are not one."""
    object.__setattr__(owner, attr, t)


class _Loaded:
    """One block's device copies: parameters/buffers by name and LoRA tensors by owner."""

    def __init__(self, tensors: Dict[str, torch.Tensor], lora: List[Tuple[Any, str, torch.Tensor]],
                 signature: tuple, ready: Optional["torch.cuda.Event"]) -> None:
        self.tensors = tensors
        self.lora = lora
        self.signature = signature
        self.ready = ready


class _AttachUndo:
    """What a ``BlockStreamer.attach`` changed so far, and ``run()`` to put it back (an error midway)."""

    def __init__(self, streamer: "BlockStreamer") -> None:
        self.streamer = streamer
        self.children: List[Tuple[nn.Module, Optional[torch.device]]] = []  # non-block modules, their device
        self.tensors: List[Tuple[torch.Tensor, torch.Tensor]] = []  # block parameters/buffers, their data
        self.lora: List[Tuple[Any, str, torch.Tensor]] = []  # LoRA tensors, the tensor before

    def run(self) -> None:
        s = self.streamer
        s._unhook(lambda block: None)
        s.release()
        for owner, attr, t in reversed(self.lora):
            _move(owner, attr, t)
        for t, data in reversed(self.tensors):
            t.data = data
        for child, device in self.children:
            if device is not None:
                child.to(device)


class BlockStreamer:
    """Streams ``dit.blocks`` from pinned CPU memory to ``device``, ``prefetch`` blocks ahead.

    Attach with ``BlockStreamer(dit, device).attach()`` (``detach()`` undoes it). Afterwards the
    blocks' parameters and buffers live in (pinned, when CUDA is available) CPU memory, the other
    modules of ``dit`` (embedders, final layer) on ``device``. Per block call:

    * pre-hook of block ``i``: make sure block ``i`` is loaded (issued earlier as a prefetch, or
      now), make the compute stream wait for its copy, point the parameters (``.data``) and the
      active LoRA tensors at the device copies, and issue the copies of the next ``prefetch``
      blocks on a side stream (block 0 follows the last block: the next step starts loaded);
    * post-hook: point everything back at the CPU copies and drop the device copies (with CUDA
      the allocator keeps their memory until the compute stream has used them: ``record_stream``);
      a block call that raises (e.g. out of memory) also drops the prefetched copies.

    ``forward_kv_only`` (the last block of a cache build) is wrapped the same way. A prefetched
    copy is re-issued when the CPU weights changed since (``param._version``: ``fuse_lora`` and
    ``load_state_dict`` write in place; peft's ``merge_adapter``: its ``merged_adapters``), or the set
    of active LoRA tensors changed. A write through ``param.data`` bumps no version counter: after
    one of your own, call ``release()`` (the prefetched block 0 would be the old weights).

    Args:
        dit: a ``LongCatDiT`` (anything with ``blocks``, an ``nn.ModuleList``).
        device: where the blocks compute.
        prefetch (int): blocks copied ahead (>= 1 with CUDA; 1 keeps 2 blocks on the device).
        pin (bool | None): pin the CPU copies (default: when CUDA is available).

    Attributes:
        log (list | None): set to a list to record ``("load", i)``, ``("attach", i)``,
            ``("free", i)`` events (tests).
    """

    def __init__(self, dit: nn.Module, device, *, prefetch: int = 1, pin: Optional[bool] = None) -> None:
        blocks = getattr(dit, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise TypeError(f"BlockStreamer: dit must have a non-empty nn.ModuleList 'blocks', got {type(blocks).__name__}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"BlockStreamer: prefetch must be an int >= 0, got {prefetch!r}")
        from .loading import check_device

        self.dit = dit
        # meta moved the embedders and final layer onto it at attach() (their weights gone, detach() could not bring
        # them back); an unavailable CUDA device or an int failed in torch.cuda.Stream naming no argument
        if device is None:  # (check_device's message offers None: the pipeline's default, not one here)
            raise TypeError("BlockStreamer: device: expected a str or torch.device (e.g. 'cuda:0'), got None")
        self.device = check_device(device, "BlockStreamer: device")
        self.prefetch = prefetch
        if pin is not None:
            check_bool(pin, "BlockStreamer: pin")  # pin="no" pinned every block (tens of GiB of page-locked memory)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._loaded: Dict[int, _Loaded] = {}
        self._active: Dict[int, _Loaded] = {}
        self._handles: List[Any] = []
        self._own_attrs: List[Dict[str, Any]] = []  # per block: its own forward/forward_kv_only before attach()
        self._own_root: Optional[Dict[str, Any]] = None  # the same for the DiT's forward/build_kv_cache
        self._attached = False
        self.log: Optional[List[Tuple[str, int]]] = None

    # ------------------------------------------------------------------ setup
    @property
    def depth(self) -> int:
        return len(self.dit.blocks)

    def attach(self) -> "BlockStreamer":
        """Moves the blocks to (pinned) CPU memory, the rest of ``dit`` to ``device``, installs the hooks."""
        if self._attached:
            return self
        if getattr(self.dit, "_block_streamer", None) is not None:
            raise ValueError("BlockStreamer: this model already has a block streamer attached")
        blocks = self.dit.blocks
        # what attach() changes, so that an error midway (pinned memory or device memory running out,
        # a KeyboardInterrupt while tens of GiB are pinned) undoes it: the hooks of the blocks done so far
        # stayed registered with no streamer recorded, a retry stacked a second set on them (its detach
        # left the first) and the non-block modules stayed on the device
        undo = _AttachUndo(self)
        try:
            for name, child in self.dit.named_children():
                if child is not blocks:
                    first = next(iter(list(child.parameters()) + list(child.buffers())), None)
                    undo.children.append((child, None if first is None else first.device))
                    child.to(self.device)
            self._attach_blocks(blocks, undo)
            self._wrap_root()
        except BaseException:
            undo.run()
            raise
        self.dit._block_streamer = self
        self._attached = True
        return self

    def _attach_blocks(self, blocks: nn.ModuleList, undo: "_AttachUndo") -> None:
        for i, block in enumerate(blocks):
            for t in self._block_tensors(block).values():
                undo.tensors.append((t, t.data))
                t.data = self._home(t.data)
            for owner, attr, t in _lora_tensors(block, loaded=True):
                undo.lora.append((owner, attr, t))
                _move(owner, attr, self._home(t))
            # Hooks (not a wrapper alone, as for forward_kv_only): they run from nn.Module.__call__, so they
            # also hold when something replaces block.forward on the instance after attach() (activation
            # checkpointing does), and forward pre-hooks registered later see the device copies.
            self._handles.append(block.register_forward_pre_hook(self._make_pre(i)))
            # always_call: a block that raises (e.g. out of memory) is still put back at home.
            self._handles.append(block.register_forward_hook(self._make_post(i), always_call=True))
            # torch runs always_call hooks on Exception only: a KeyboardInterrupt left the block on its
            # device copies, and a fuse_lora after it wrote into them (the LoRA lost, then subtracted)
            # what the instance had before (activation checkpointing's forward, say): wrapped, put back by detach()
            self._own_attrs.append({n: block.__dict__[n] for n in ("forward", "forward_kv_only") if n in block.__dict__})
            block.forward = self._wrap_forward(block, i)
            if hasattr(block, "forward_kv_only"):
                block.forward_kv_only = self._wrap_kv_only(block, i)

    def _wrap_root(self) -> None:
        """Wraps the DiT's ``forward`` and ``build_kv_cache``: when they return or raise, no block is left on its
        device copies. A KeyboardInterrupt between a block's pre-hook and its forward wrapper (in
        ``nn.Module.__call__``), or in a hook of the user's, skips the post-hook (torch runs ``always_call`` hooks
        on an Exception only): the block stayed on its device copies, a ``fuse_lora`` after it wrote into them
        and the next call put the unfused CPU copies back (fused and unfused results wrong from then on)."""
        dit = self.dit
        self._own_root = {n: dit.__dict__[n] for n in ("forward", "build_kv_cache") if n in dit.__dict__}
        for name in ("forward", "build_kv_cache"):
            inner = getattr(dit, name, None)
            if inner is None:
                continue

            @functools.wraps(inner)
            def call(*args, _inner=inner, **kwargs):
                self._refuse_backward(args, kwargs)
                try:
                    return _inner(*args, **kwargs)
                finally:
                    self._settle()

            setattr(dit, name, call)

    def _refuse_backward(self, args, kwargs) -> None:
        """A forward that autograd records, with the blocks streamed to another device than their CPU homes, is
        refused before it runs: autograd saves the weights themselves, and the post-hook points their ``.data``
        back at the CPU copies, so the backward met CPU weights beside device gradients (a device-mismatch error
        from deep inside ``backward()``, after the whole forward)."""
        if not torch.is_grad_enabled() or self.device.type == "cpu":
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.dit.blocks.parameters()):
            raise RuntimeError(
                f"the DiT streams its blocks to {self.device} (memory='balanced' / 'low', BlockStreamer): a forward "
                "that autograd records cannot run through streamed weights (the backward would meet their CPU "
                "copies); train with memory='resident', or run the forward under torch.no_grad()")

    def _settle(self) -> None:
        """Puts back at home every block left on its device copies (see ``_wrap_root``)."""
        for j in list(self._active):
            self._after(j)

    def detach(self, device=None) -> None:
        """Removes the hooks and puts the blocks on ``device`` (default: the streamer's device)."""
        if not self._attached:
            return
        self.release()
        target = self.device if device is None else torch.device(device)

        def home(block):
            block.to(target)
            for owner, attr, t in _lora_tensors(block, loaded=True):
                _move(owner, attr, t.to(target))

        self._unhook(home)
        self.dit._block_streamer = None

    def _unhook(self, each_block) -> None:
        """Removes the hooks and the forward wrappers of the blocks attached so far, calling
        ``each_block(block)`` after each (``detach`` and an ``attach`` undone midway)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._own_root is not None:
            for name in ("forward", "build_kv_cache"):
                if name in self._own_root:
                    setattr(self.dit, name, self._own_root[name])
                else:
                    self.dit.__dict__.pop(name, None)
            self._own_root = None
        for block, own in zip(self.dit.blocks, self._own_attrs):
            for name in ("forward", "forward_kv_only"):
                if name in own:
                    setattr(block, name, own[name])
                elif name in block.__dict__:
                    delattr(block, name)
            each_block(block)
        self._own_attrs.clear()
        self._attached = False

    def release(self) -> None:
        """Drops every prefetched device copy (e.g. before the VAE decode), and puts back at home a block an
        interrupted call left on its device copies."""
        self._settle()
        self._loaded.clear()

    def _home(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as a CPU tensor (pinned when ``self.pin``), copied only when needed."""
        if t.device.type == "cpu" and (not self.pin or t.is_pinned()):
            return t
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin)
        out.copy_(t)
        return out

    @staticmethod
    def _block_tensors(block: nn.Module) -> Dict[str, torch.Tensor]:
        d: Dict[str, torch.Tensor] = dict(block.named_parameters())
        d.update(dict(block.named_buffers()))
        return d

    def _signature(self, block: nn.Module, lora) -> tuple:
        ts = self._block_tensors(block)
        return (
            # data_ptr: which CPU copy; the parameter's own version counter: in-place writes
            # (``fuse_lora``'s ``weight.copy_``). ``t.data`` is a fresh alias on every access. tensor_version:
            # a model made under torch.inference_mode() has no counters (``_version`` raised at the first step)
            tuple((n, t.data_ptr(), tensor_version(t)) for n, t in ts.items()),
            # a LoRA reloaded under its name gets new tensors, which may take freed ids: stamps, not id()
            tuple((id(o), a, tensor_stamp(t), tensor_version(t)) for o, a, t in lora),
            # peft's merge_adapter / unmerge_adapter write ``weight.data += delta``: no version counter
            # sees that, but its record of the merged adapters changes with it
            tuple((n, tuple(m.merged_adapters)) for n, m in block.named_modules()
                  if isinstance(getattr(m, "merged_adapters", None), list)),
        )

    # ------------------------------------------------------------------ copies
    def _issue(self, i: int) -> None:
        block = self.dit.blocks[i]
        lora = _lora_tensors(block)
        # Pinned LoRA tensors: their copies can be asynchronous too.
        if self.pin:
            for o, a, t in lora:
                if t.device.type == "cpu" and not t.is_pinned():
                    # ``.data``: the same tensor object and version counter, so a KV cache built before
                    # (``LongCatDiT.state_fingerprint`` holds the active LoRA tensors) stays fresh
                    t.data = self._home(t)
            lora = _lora_tensors(block)
        sig = self._signature(block, lora)
        src = {n: t.data for n, t in self._block_tensors(block).items()}
        if self.cuda:
            # The side stream must not copy into memory that queued compute work still reads.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                dev = {n: t.to(self.device, non_blocking=True) for n, t in src.items()}
                dev_lora = [(o, a, t.to(self.device, non_blocking=True)) for o, a, t in lora]
                ev = torch.cuda.Event()
                ev.record(self.stream)
        else:
            # CPU (tests) or another device without streams: a synchronous copy, kept distinct from
            # the CPU storage so tests can tell a loaded block from a resident one.
            dev = {n: t.to(self.device, copy=True) for n, t in src.items()}
            dev_lora = [(o, a, t.to(self.device, copy=True)) for o, a, t in lora]
            ev = None
        self._loaded[i] = _Loaded(dev, dev_lora, sig, ev)
        if self.log is not None:
            self.log.append(("load", i))

    def _before(self, i: int) -> None:
        # Blocks run one at a time: a block still attached here was left by an exception that
        # skipped its post-hook (forward_kv_only's wrapper, or a hook run that raised).
        for j in list(self._active):
            self._after(j)
        try:
            self._attach_block(i)
        except BaseException:
            # e.g. a KeyboardInterrupt while swapping or prefetching: no post-hook follows it
            self._fail(i)
            raise

    def _attach_block(self, i: int) -> None:
        block = self.dit.blocks[i]
        got = self._loaded.pop(i, None)
        if got is not None and got.signature != self._signature(block, _lora_tensors(block)):
            got = None  # weights or active adapters changed since the prefetch: copy again
        if got is None:
            self._issue(i)
            got = self._loaded.pop(i)
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(got.ready)
            for t in got.tensors.values():
                t.record_stream(cur)
            for _, _, t in got.lora:
                t.record_stream(cur)
        tensors = self._block_tensors(block)
        # recorded before the first swap, so that an interruption midway is undone by ``_after``
        active = _Loaded({n: t.data for n, t in tensors.items()}, [(o, a, getattr(o, a)) for o, a, _ in got.lora],
                         (), None)
        self._active[i] = active
        for n, t in tensors.items():
            t.data = got.tensors[n]
        for o, a, t in got.lora:
            _move(o, a, t)
        if self.log is not None:
            self.log.append(("attach", i))
        for k in range(1, self.prefetch + 1):
            j = (i + k) % self.depth
            if j != i and j not in self._loaded and j not in self._active:
                self._issue(j)

    def _after(self, i: int) -> None:
        homes = self._active.get(i)
        if homes is None:
            return
        block = self.dit.blocks[i]
        for n, t in self._block_tensors(block).items():
            t.data = homes.tensors[n]
        for o, a, t in homes.lora:
            _move(o, a, t)
        # forgotten only once every tensor is back: an interrupt part way left some on their device copies with no
        # record of their homes (the next call then took the device copies for the homes)
        del self._active[i]
        if self.log is not None:
            self.log.append(("free", i))

    def _fail(self, i: int) -> None:
        """Block ``i``'s call raised: puts it back at home and drops the prefetched copies too (after an
        out-of-memory error the caller needs that memory back, not a block kept for a next call)."""
        self._after(i)
        self.release()

    def _make_pre(self, i: int) -> Callable:
        def pre(module, args):
            self._before(i)

        return pre

    def _make_post(self, i: int) -> Callable:
        def post(module, args, output):
            self._after(i)

        return post

    def _wrap_forward(self, block: nn.Module, i: int) -> Callable:
        inner = block.forward  # the instance's own (activation checkpointing's) or the class's

        def forward(*args, **kwargs):
            try:
                return inner(*args, **kwargs)
            except BaseException:
                self._fail(i)  # the post-hook follows an Exception, not a KeyboardInterrupt
                raise

        return forward

    def _wrap_kv_only(self, block: nn.Module, i: int) -> Callable:
        inner = block.forward_kv_only

        def forward_kv_only(*args, **kwargs):
            self._before(i)
            try:
                out = inner(*args, **kwargs)
            except BaseException:
                self._fail(i)
                raise
            self._after(i)
            return out

        return forward_kv_only

    # ------------------------------------------------------------------ facts
    def block_bytes(self) -> int:
        """Bytes of the largest block (its parameters, buffers and active LoRA tensors)."""
        best = 0
        for block in self.dit.blocks:
            n = sum(t.numel() * t.element_size() for t in self._block_tensors(block).values())
            n += sum(t.numel() * t.element_size() for _, _, t in _lora_tensors(block))
            best = max(best, n)
        return best


# ============================================================================ text encoder
def _group_offloading():
    """diffusers' ``apply_group_offloading``, or ImportError naming what the streaming modes need."""
    try:
        importlib.import_module("accelerate")  # diffusers' group offloading moves inputs with it
        from diffusers.hooks import apply_group_offloading
    except ImportError as e:
        raise ImportError(
            f"memory modes other than 'resident' stream the text encoder with diffusers' group offloading, "
            f"which needs diffusers and accelerate (pip install accelerate): {e}"
        ) from e
    return apply_group_offloading


# text encoders offloaded by ``offload_text_encoder`` -> their onload device
_OFFLOADED_TEXT_ENCODERS: "weakref.WeakKeyDictionary[nn.Module, torch.device]" = weakref.WeakKeyDictionary()


def offload_text_encoder(text_encoder: nn.Module, device) -> None:
    """Keeps ``text_encoder`` in CPU memory and streams it leaf module by leaf module to ``device``
    while it encodes, through diffusers' ``apply_group_offloading`` (leaf level; on CUDA with a side
    stream and pinned copies so the next leaf's copy overlaps the current one's compute).

    Idempotent: a text encoder already offloaded to ``device`` is left as it is (``balanced`` ->
    ``low``); ValueError for another device."""
    apply_group_offloading = _group_offloading()
    device = torch.device(device)
    done = _OFFLOADED_TEXT_ENCODERS.get(text_encoder)
    if done is not None:
        # a second apply_group_offloading pins another copy of every weight and, with streams,
        # raises on its already registered prefetch hook
        if _device_key(done) != _device_key(device):
            raise ValueError(f"offload_text_encoder: text_encoder: already offloaded to {done}, got {device}")
        return
    text_encoder.to("cpu")
    cuda = device.type == "cuda"
    apply_group_offloading(text_encoder, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="leaf_level", use_stream=cuda, non_blocking=cuda)
    _OFFLOADED_TEXT_ENCODERS[text_encoder] = device


# ============================================================================ estimate
def _params_bytes(n_params: int, nbytes: int) -> int:
    return int(n_params) * int(nbytes)


def dit_param_counts(config) -> Tuple[int, int]:
    """``(per_block, outside_blocks)`` parameter counts of a ``LongCatDiT`` with ``config``
    (built on the meta device: no memory)."""
    from .dit import LongCatDiT

    import dataclasses

    m = LongCatDiT(dataclasses.replace(config, depth=1), device="meta")
    per_block = sum(p.numel() for p in m.blocks[0].parameters())
    outside = sum(p.numel() for p in m.parameters()) - per_block
    return per_block, outside


def _fp8_target_counts(config) -> Tuple[int, int]:
    """``(weight numel, output channels)`` of one block's ``fp8.FP8_TARGETS`` linears: what
    ``quantize_dit_fp8`` stores as e4m3 (1 byte each) with one fp32 scale per output channel."""
    from .dit import LongCatDiT
    from .fp8 import FP8_TARGETS

    block = LongCatDiT(dataclasses.replace(config, depth=1), device="meta").blocks[0]
    weights = [block.get_submodule(name).weight for name in FP8_TARGETS]
    return sum(w.numel() for w in weights), sum(w.shape[0] for w in weights)


# Activation bytes of one DiT step as a multiple of one ``[tokens, hidden]`` tensor in the weight
# dtype: calibrated on the H200 measurement of issue 17 (480p B2 c4 cache on: 35.7 GiB peak =
# 25.3 weights + 4.6 cache + 5.8 rest, 62,400 tokens x 4096 x 2 B = 0.476 GiB -> 12.2), rounded up.
ACTIVATION_FACTOR = 13.0
# UMT5-XXL encoder parameters (the released text encoder) and the Wan VAE's.
UMT5_XXL_PARAMS = 5_680_000_000
WAN_VAE_PARAMS = 127_000_000
# Decode peak of the Wan VAE per output pixel of one 4-frame chunk (upper guess; the bench
# measures it): a few hundred bytes per pixel of the upsampling stages.
VAE_DECODE_BYTES_PER_PIXEL = 6 * 1024


def _check_count(value, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (numpy ints taken); TypeError / ValueError naming ``name``."""
    value = plain_int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_budget_args(budget_bytes, margin) -> None:
    """The fit checks' ``budget_bytes`` (None, or a finite number of bytes >= 0: a string such as
    ``"24GiB"`` failed deep in a comparison, NaN refused every mode as 'nan GiB usable') and ``margin``
    (a finite number > 0: 0 or a negative one let every mode fit, NaN refused them all)."""
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Real):
            raise TypeError(f"budget_bytes: expected a number of bytes or None (24 GiB: 24 * 2**30), "
                            f"got {type(budget_bytes).__name__} {budget_bytes!r}")
        if not math.isfinite(budget_bytes) or budget_bytes < 0:
            raise ValueError(f"budget_bytes: expected a finite number of bytes >= 0, got {budget_bytes!r}")
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin: expected a finite number > 0, got {type(margin).__name__} {margin!r}")
    if not math.isfinite(margin) or not margin > 0:
        raise ValueError(f"margin: expected a finite number > 0 (the estimate is multiplied by it), got {margin!r}")


def estimate_peak_bytes(config, mode: str, *, height: int = 480, width: int = 832, num_frames: int = 93,
                        num_cond_frames: int = 13, batch: int = 2, dtype_bytes: int = 2,
                        text_encoder_params: int = UMT5_XXL_PARAMS, vae_params: int = WAN_VAE_PARAMS,
                        lora_rank: int = 0, fp8: bool = False, offload_kv_cache: Optional[bool] = None,
                        kv_cache: bool = True, sp_size: int = 1, cfg_parallel: bool = False) -> Dict[str, int]:
    """Estimated peak accelerator bytes per stage of one VC call in ``mode``, from the config alone.

    Stages: ``text`` (encoder weights resident, or one streamed leaf), ``vae_encode`` /
    ``decode`` (VAE weights + decode working set), ``cache_build`` and ``denoise`` (DiT weights
    resident or two streamed blocks, KV cache resident or two streamed blocks, activations of
    ``batch x noisy tokens``). Resident weights of every component count in every stage; ``peak``
    is the maximum. ``fp8``: the blocks' large linears (``fp8.FP8_TARGETS``, ~95.5% of a block)
    take 1 byte per weight plus an fp32 scale per output channel.
    An estimate for the fit check, not a measurement. ``offload_kv_cache`` (None: as the mode
    says) and ``kv_cache`` (False: no cache, every step runs cond and noisy tokens) follow the
    call's options. Context parallel (``longcat_vc.parallel``, resident only): ``sp_size`` ranks of a
    sequence-parallel group each hold ``ceil(tokens per frame / sp_size)`` token slots of every frame
    (their activations) and ``1 / sp_size`` of the KV cache's heads; with ``cfg_parallel`` an even
    ``batch`` is halved per rank. Weights, text encoder and VAE are whole on every rank.
    """
    plan = memory_plan(mode)
    # a float, negative or zero size, batch, rank or byte count gave a float, shrunken or negative estimate
    # without a word (a frame smaller than a 16-pixel patch was blamed on num_cond_frames)
    height, width = _check_count(height, "height", 16), _check_count(width, "width", 16)
    num_frames = _check_count(num_frames, "num_frames", 1)
    num_cond_frames = _check_count(num_cond_frames, "num_cond_frames", 0)
    batch, dtype_bytes = _check_count(batch, "batch", 1), _check_count(dtype_bytes, "dtype_bytes", 1)
    lora_rank = _check_count(lora_rank, "lora_rank", 0)
    text_encoder_params = _check_count(text_encoder_params, "text_encoder_params", 0)
    vae_params = _check_count(vae_params, "vae_params", 0)
    check_bool(fp8, "fp8")
    check_bool(kv_cache, "kv_cache")
    sp_size = _check_count(sp_size, "sp_size", 1)
    check_bool(cfg_parallel, "cfg_parallel")
    if offload_kv_cache is not None:
        check_bool(offload_kv_cache, "offload_kv_cache")
    offload = plan.offload_kv_cache if offload_kv_cache is None else offload_kv_cache
    per_block, outside = dit_param_counts(config)
    depth = config.depth
    C = config.hidden_size
    b = dtype_bytes
    if fp8:
        # e4m3 weights of the ``FP8_TARGETS`` linears + their fp32 per-channel scales; the rest of a
        # block (adaLN, biases, norms: ~4.5% of it at the released config) stays in the model dtype
        q_numel, q_rows = _fp8_target_counts(config)
        block_b = q_numel + 4 * q_rows + (per_block - q_numel) * b
    else:
        block_b = per_block * b
    if lora_rank:
        # Unfused LoRA on every linear of a block: about rank * (in + out) per linear; qkv, proj,
        # kv, q, out, w1, w2, w3, adaLN: ~ 30 C in + out in total. Stored in the compute dtype, also
        # next to fp8 weights (``lora._adapter_dtype``).
        block_b += lora_rank * 30 * C * b
    t_lat = (num_frames - 1) // 4 + 1
    c = 1 + (num_cond_frames - 1) // 4
    tok_frame = (height // 16) * (width // 16)
    noisy = (t_lat - c) * tok_frame
    if noisy <= 0:
        raise ValueError(f"num_cond_frames={num_cond_frames} leaves no frame to generate in num_frames={num_frames} "
                         f"({c} cond latents of {t_lat}); the estimate would be meaningless")
    cond = c * tok_frame
    dit_w = (block_b * (depth if not plan.stream_dit_blocks else 2)) + _params_bytes(outside, b)
    # context parallel: each rank's heads of the cache, its token slots of every frame, its CFG half
    cache_full = 2 * cond * C * b * depth // sp_size if kv_cache else 0
    cache = cache_full if not offload else 2 * cache_full // depth
    slots = -(-tok_frame // sp_size)
    noisy_local, cond_local = (t_lat - c) * slots, c * slots
    batch_local = batch // 2 if cfg_parallel and batch % 2 == 0 else batch
    act_denoise = int(ACTIVATION_FACTOR * batch_local * (noisy_local if kv_cache else noisy_local + cond_local) * C * b)
    act_build = int(ACTIVATION_FACTOR * cond_local * C * b)
    te_w = _params_bytes(text_encoder_params, b)
    # Streamed leaf by leaf: the largest leaf is UMT5's token embedding (256k x 4096, ~19% of it).
    te = te_w if not plan.stream_text_encoder else te_w // 5
    vae_w = _params_bytes(vae_params, b)
    te_resident = 0 if plan.stream_text_encoder else te_w
    decode_act = int(VAE_DECODE_BYTES_PER_PIXEL * height * width)
    stages = {
        "text": dit_w + te + vae_w,
        "vae_encode": dit_w + te_resident + vae_w + decode_act,
        "cache_build": dit_w + te_resident + vae_w + cache + act_build,
        "denoise": dit_w + te_resident + vae_w + cache + act_denoise,
        "decode": dit_w + te_resident + vae_w + decode_act,
    }
    stages["peak"] = max(stages.values())
    return stages


def device_bytes(modules, device) -> int:
    """Bytes of the parameters and buffers of ``modules`` (None entries skipped) that live on
    ``device``, each storage counted once."""
    device = torch.device(device)
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _memory_fraction(device) -> float:
    """``set_per_process_memory_fraction``'s cap on ``device`` (1.0 where torch cannot say)."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is None:  # pragma: no cover - older torch
        return 1.0
    try:
        return float(getter(device))
    except Exception:  # pragma: no cover - an allocator without the query
        return 1.0


def usable_bytes(device, own_bytes: int = 0) -> int:
    """Bytes this process can still use on ``device`` plus ``own_bytes`` (what the caller already
    holds there and counts in its estimate): the driver's free memory and the caching allocator's
    reserved-but-unallocated blocks, capped by ``set_per_process_memory_fraction``."""
    device = torch.device(device)
    free, total = torch.cuda.mem_get_info(device)
    frac = _memory_fraction(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated
    return max(0, min(free + cached, int(total * frac) - allocated)) + int(own_bytes)


def check_memory_fits(config, mode: str, device, *, budget_bytes: Optional[int] = None, margin: float = 1.05,
                      context_parallel: bool = False, **shape) -> Dict[str, int]:
    """Raises ``MemoryModeError`` before any weight is loaded when ``mode`` cannot fit ``device``.

    Args:
        config: the ``DiTConfig`` (read from ``dit/config.json``).
        mode: the requested memory mode.
        device: the accelerator; CPU devices are not checked.
        budget_bytes: usable bytes (default: ``usable_bytes(device)``: the free memory and the caching
            allocator's free blocks, capped by ``set_per_process_memory_fraction``, as the refine's check).
        margin: the estimate is multiplied by this before comparing.
        context_parallel: the pipeline runs context parallel, where only ``resident`` is supported
            (``refuse_streaming_with_context_parallel``): the hint names no streaming mode. Pass the
            layout in ``shape`` (``sp_size``, ``cfg_parallel``).
        shape: passed to ``estimate_peak_bytes`` (height, width, num_frames, ...).

    Returns:
        the estimate of ``mode`` (``estimate_peak_bytes``).
    """
    memory_plan(mode)
    check_budget_args(budget_bytes, margin)
    check_bool(context_parallel, "context_parallel")
    device = torch.device(device)
    est = estimate_peak_bytes(config, mode, **shape)
    if budget_bytes is None:
        if device.type != "cuda" or not torch.cuda.is_available():
            return est
        # the allocator's free blocks count: a pipeline deleted in this process left its memory reserved
        # (not free to the driver), and the driver's free memory alone refused a mode that fits
        budget_bytes = usable_bytes(device)
    need = est["peak"] * margin
    if need <= budget_bytes:
        return est
    # context parallel: the streaming modes are refused (a hint naming one sent the user to that refusal)
    modes = ("resident",) if context_parallel else MEMORY_MODES
    fits = [m for m in modes if estimate_peak_bytes(config, m, **shape)["peak"] * margin <= budget_bytes]
    where = f"{device}" if device.type != "cuda" else f"{device} ({budget_bytes / GiB:.1f} GiB usable)"
    stage = max((k for k in est if k != "peak"), key=lambda k: est[k])
    if fits:
        hint = f"memory={fits[0]!r} (--memory {fits[0]}) fits, estimated {estimate_peak_bytes(config, fits[0], **shape)['peak'] / GiB:.1f} GiB"
    elif context_parallel:
        hint = ("context parallel runs memory='resident' only (every rank holds the whole DiT, text encoder and VAE); "
                "use more ranks, a lower resolution or fewer frames")
    else:
        low = estimate_peak_bytes(config, "low", **shape)["peak"]
        hint = (f"no mode fits: even memory='low' needs about {low / GiB:.1f} GiB; try a lower resolution or "
                "fewer frames")
    raise MemoryModeError(
        f"memory={mode!r} needs about {need / GiB:.1f} GiB on {where} (peak in stage {stage!r}); {hint}"
    )


# ============================================================================ apply
def _device_key(device: torch.device) -> Tuple[str, Optional[int]]:
    """``(type, index)`` with CUDA's current device for a bare ``cuda`` (the device it means); ``cpu:0`` is
    ``cpu`` (one CPU device: a pipeline loaded with ``device="cpu:0"`` was refused its own device)."""
    if device.type == "cuda" and device.index is None:
        return "cuda", torch.cuda.current_device()
    if device.type == "cpu":
        return "cpu", None
    return device.type, device.index


def _check_stream_device(dit, device: torch.device) -> None:
    """ValueError when ``dit`` already streams its blocks to another device than ``device``: the
    attached streamer would keep them there while the rest of the pipeline moved."""
    streamer = getattr(dit, "_block_streamer", None)
    if streamer is not None and _device_key(streamer.device) != _device_key(device):
        raise ValueError(f"apply_memory_mode: device: the DiT blocks stream to {streamer.device}, got {device}; "
                         "a streaming pipeline stays on its device (load a fresh one for another device)")


def refuse_streaming_with_context_parallel(mode: str, what: str) -> None:
    """Raises ``ValueError`` for a streaming memory mode together with context parallelism (``what``
    names the other side): untested, every rank would stream its own copy of the blocks. For
    ``from_pretrained`` and ``apply_memory_mode`` (a hand-built pipeline passed the latter;
    ``LongCatDiT.enable_context_parallel`` refuses the other order)."""
    if mode != "resident":
        raise ValueError(f"memory={mode!r} is not supported with {what} (context parallel); use memory='resident'")


def apply_memory_mode(pipe, mode: str, device) -> MemoryPlan:
    """Puts the components of ``pipe`` (loaded on the CPU, or anywhere) where ``mode`` wants them
    and records the plan on ``pipe._memory``. Returns the plan."""
    from .loading import check_device

    plan = memory_plan(mode)
    device = torch.device(device)
    prev = getattr(pipe, "_memory", None)
    dit = pipe.dit
    if prev is not None and ((prev.stream_dit_blocks and not plan.stream_dit_blocks)
                             or (prev.stream_text_encoder and not plan.stream_text_encoder)):
        # the streaming hooks of the previous mode would stay attached under a plan that says resident
        raise ValueError(f"apply_memory_mode: the pipeline streams (memory={prev.name!r}); switching to {mode!r} "
                         f"needs a fresh VideoContinuationPipeline.from_pretrained(..., memory={mode!r})")
    # the same for components another pipeline made stream since this one recorded its mode (two pipelines on
    # one DiT / text encoder): 'resident' was recorded over the attached hooks
    offloaded = getattr(pipe, "text_encoder", None) in _OFFLOADED_TEXT_ENCODERS
    streams = [what for what, on in (("DiT blocks", getattr(dit, "_block_streamer", None) is not None),
                                     ("text encoder", offloaded)) if on]
    if streams and not (plan.stream_dit_blocks and plan.stream_text_encoder):
        raise ValueError(f"apply_memory_mode: the pipeline's {' and '.join(streams)} stream (another pipeline on them "
                         f"runs memory='balanced' or 'low'); switching to {mode!r} needs a fresh "
                         f"VideoContinuationPipeline.from_pretrained(..., memory={mode!r})")
    if getattr(dit, "context_parallel", None) is not None:
        refuse_streaming_with_context_parallel(plan.name, "a DiT that runs context parallel")
    _check_stream_device(dit, device)
    # meta: 'resident' moved every weight onto it (gone); CUDA unavailable or not visible: torch's error named nothing
    device = check_device(device, "apply_memory_mode: device")
    if plan.stream_text_encoder:
        # before anything moves: missing accelerate left the DiT's block streamer attached under the
        # previous plan (recorded 'resident' while the blocks streamed)
        _group_offloading()
    attached = None
    if plan.stream_dit_blocks:
        if getattr(dit, "_block_streamer", None) is None:
            # where the blocks were: an error in the text encoder's offloading (its pinned copies running
            # out of host memory, a KeyboardInterrupt) or the VAE's move left the blocks streaming under the
            # previous plan ('resident'), which then let a switch back to 'resident' keep the hooks
            before = next(iter(dit.blocks.parameters()), torch.empty(0)).device
            attached = BlockStreamer(dit, device).attach()
    else:
        dit.to(device)
    try:
        if plan.stream_text_encoder:
            offload_text_encoder(pipe.text_encoder, device)
        else:
            pipe.text_encoder.to(device)
        pipe.vae.to(device)
    except BaseException:
        if attached is not None:
            attached.detach(before)
            dit.to(before)  # attach() moved the non-block modules to ``device``
        raise
    pipe._memory = plan
    return plan

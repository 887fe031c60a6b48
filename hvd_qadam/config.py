"""What a user chooses: one validated, hashable description of the compression pipeline."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .api import ROUNDINGS, check_bucket_size
from .quant import codebooks as cb
from .exchange import DEFAULT as DEFAULT_EXCHANGE, POLICIES as _EXCHANGE_POLICIES
from .transport import TOPOLOGIES as _TOPOLOGY_CLASSES

ALGORITHMS = ("qsgd", "efficient_adam", "qadam", "qadam_weights", "ef_sgd", "local_sgd", "onebit_adam")
TOPOLOGIES = tuple(_TOPOLOGY_CLASSES)      # resolved names; the optimizer also takes "auto"
EXCHANGES = tuple(_EXCHANGE_POLICIES)
NONFINITE_POLICIES = ("raise", "skip", "propagate")
DEFAULT_FREEZE_STEP = 100           # onebit_adam: full-precision Adam steps before v is frozen
DEFAULT_V_REFRESH_EVERY = 50        # onebit_adam: steps between uncompressed v refreshes after the freeze
FREEZE_AUTO_NEVER = 2 ** 62         # freeze_step="auto" without a cap: warm up until v is stable
# A link's bit width when none is given, where it differs from the quantizer's own default (4).
# The max-abs and L2 grids default to 6 bits in the pipeline: at 4 bits the defaults trained a
# 10M-parameter LM 1.9 % above Horovod Adam's validation loss (3 seeds), at 6 bits 0.2 %, for a
# step 21 % slower than 4 bits on a 100 Mbit/s link and 4 % on 1 Gbit/s (README, Convergence).
LINK_DEFAULT_BITS = {"qsgd": 6, "qsgdinf": 6}


@dataclass(frozen=True)
class LinkSpec:
    """One direction's quantizer: name, bit width, bucket size, rounding."""
    quantizer: str = "qsgd"
    bits: int | None = None         # None: LINK_DEFAULT_BITS, else the quantizer's default (4, or its fixed width)
    bucket_size: int = 128          # see optimizer._default_bucket_size
    rounding: str | None = None     # None: the quantizer's default (stochastic if unbiased)

    def __post_init__(self):
        k = cb.kind(self.quantizer)
        bits = LINK_DEFAULT_BITS.get(self.quantizer) if self.bits is None else self.bits
        object.__setattr__(self, "bits", k.check_bits(bits))
        if not k.passthrough:
            check_bucket_size(self.bucket_size)
        if self.rounding is not None and self.rounding not in ROUNDINGS:
            raise cb.QuantizerError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def stochastic(self) -> bool:
        return cb.kind(self.quantizer).stochastic if self.rounding is None else self.rounding == "stochastic"

    @property
    def passthrough(self) -> bool:
        return cb.kind(self.quantizer).passthrough


NONE_LINK = LinkSpec("none", None)


@dataclass(frozen=True)
class Config:
    algorithm: str = "qsgd"
    topology: str = "allgather"
    exchange: str = DEFAULT_EXCHANGE        # compressed / horovod / auto (:mod:`hvd_qadam.exchange`)
    uplink: LinkSpec = LinkSpec("qsgdinf")
    downlink: LinkSpec = NONE_LINK          # server -> workers (efficient_adam, qadam, ef_sgd, qadam_weights)
    error_feedback: bool = True             # worker EF on the uplink
    server_error_feedback: bool = True      # server EF on a quantized downlink
    seed: int = 0
    warmup_steps: int = 0                   # uncompressed steps first
    min_compress_numel: int = 1024          # smaller tensors (biases, norms) travel unquantized
                                            # (fp32, or 2 bytes: see passthrough_wire)
    fusion_threshold_bytes: int = 25 << 20  # fp32 bytes per fused buffer
    nonfinite: str = "raise"
    # algorithm hyper-parameters that are not in the torch param_groups
    bias_correction: bool = True
    momentum_steps: int | None = None       # ef_sgd early momentum: momentum only for the first E steps
    sync_every: int = 1                     # local_sgd averaging period I
    level_schedule: tuple = (0, 100, 2000)  # adaptive quantizers: when levels are refit ...
    level_every: int = 10000                # ... and every this many steps after the last
    freeze_step: int | str | None = None    # onebit_adam: warm-up steps (None: DEFAULT_FREEZE_STEP) or "auto"
    v_refresh_every: int | None = None      # onebit_adam: an uncompressed v-refresh step every this many
                                            # steps after the freeze (None: DEFAULT_V_REFRESH_EVERY; 0: never)

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.topology!r}; choose one of {TOPOLOGIES}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {self.exchange!r}; choose one of {EXCHANGES}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        for name in ("warmup_steps", "min_compress_numel"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("fusion_threshold_bytes", "sync_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self._check_freeze_step()

    def _check_freeze_step(self):
        """onebit_adam's warm-up is the engine's uncompressed warm-up: warmup_steps is derived from
        freeze_step (for "auto", warmup_steps, if given, caps the freeze step; the algorithm lowers it
        at run time when it decides to freeze)."""
        f, k = self.freeze_step, self.v_refresh_every
        if self.algorithm != "onebit_adam":
            if f is not None:
                raise ValueError(f"freeze_step is an option of algorithm 'onebit_adam', not {self.algorithm!r} "
                                 f"(use warmup_steps for uncompressed steps first)")
            if k is not None:
                raise ValueError(f"v_refresh_every is an option of algorithm 'onebit_adam', not {self.algorithm!r}")
            return
        if k is None:
            k = DEFAULT_V_REFRESH_EVERY
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"v_refresh_every must be a non-negative integer (0: never refresh v), got {k!r}")
        object.__setattr__(self, "v_refresh_every", k)
        if f is None:
            f = DEFAULT_FREEZE_STEP
        if f == "auto":
            if self.warmup_steps == 0:
                object.__setattr__(self, "warmup_steps", FREEZE_AUTO_NEVER)
        elif isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"freeze_step must be a positive integer or 'auto', got {f!r} (onebit_adam needs "
                             f"full-precision steps to estimate the second moment it freezes)")
        elif self.warmup_steps not in (0, f):
            raise ValueError(f"onebit_adam: warmup_steps={self.warmup_steps} conflicts with freeze_step={f}; its "
                             f"uncompressed warm-up is freeze_step (pass that only)")
        else:
            object.__setattr__(self, "warmup_steps", f)
        object.__setattr__(self, "freeze_step", f)

    def exact_float64(self, compressed: bool) -> bool:
        """Whether float64 parameters of a group keep float64 end to end (buffers, wire values,
        the mean), as Horovod averages them: only where nothing is quantized and nothing but the
        mean is computed, i.e. ``qsgd``'s gradient averaging of an uncompressed group (the small
        tensors' group, or every group with ``quantizer="none"`` and no downlink quantizer).
        Elsewhere the values are quantized from float32, and algorithm state is float32."""
        if self.algorithm != "qsgd":
            return False
        return not compressed or (self.uplink.quantizer == "none" and self.downlink.quantizer == "none")

    def passthrough_wire(self, param_dtype: str) -> str:
        """The quantizer that carries full-precision values of parameters of ``param_dtype``
        (``str(torch dtype)``) wherever nothing is quantized: the small tensors' group, warm-up
        and v-refresh steps, and ``quantizer="none"`` (in both directions, where the downlink
        travels). The one place this is decided; :class:`~hvd_qadam.layout.Layout` groups
        parameters by it and the engine sends by it.

        * ``"bf16"`` for bfloat16 parameters: their gradients are bf16 values already, and a
          result sent down is rounded to bf16 where it is applied anyway, so 2 bytes per element
          lose nothing there (what worker transforms compute in float32, e.g. Efficient-Adam's
          update, is rounded to bf16 once on the way, as a bf16 model's update is);
        * ``"fp16"`` for float16 parameters, and for every parameter (float64 in exact float64
          groups excepted) when the uplink is fp16 (``compression=hvd.Compression.fp16``): what
          Horovod's fp16 compression sends for all of them;
        * ``"none"`` otherwise: float32, or float64 in exact float64 groups."""
        if param_dtype == "torch.bfloat16":
            return "bf16"
        if param_dtype == "torch.float16" or self.uplink.quantizer == "fp16":
            return "fp16"
        return "none"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

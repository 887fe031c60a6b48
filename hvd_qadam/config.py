"""What a user chooses: one validated, hashable description of the compression pipeline."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .algorithms import ALGORITHMS, NONFINITE_POLICIES, OnebitAdam  # noqa: F401 - ALGORITHMS re-exported
from .codec import check_bucket_size, stochastic_rounding
from .quant import codebooks as cb
from .exchange import POLICIES as EXCHANGES, default as default_exchange
from .topology import TOPOLOGIES  # noqa: F401 - re-exported; the optimizer also takes "auto"

# The names a Config accepts are the registries' (ALGORITHMS, TOPOLOGIES, EXCHANGES above). onebit_adam's
# defaults are defined on its class; the names here stay for those who import them from here.
DEFAULT_FREEZE_STEP = OnebitAdam.DEFAULT_FREEZE_STEP
DEFAULT_V_REFRESH_EVERY = OnebitAdam.DEFAULT_V_REFRESH_EVERY
FREEZE_AUTO_NEVER = OnebitAdam.FREEZE_AUTO_NEVER


@dataclass(frozen=True)
class LinkSpec:
    """One direction's quantizer: name, bit width, bucket size, rounding."""
    quantizer: str = "qsgd"
    bits: int | None = None         # None: the quantizer's default (QuantizerKind.default_bits)
    bucket_size: int | None = None  # None: the quantizer's default (QuantizerKind.default_bucket_size)
    rounding: str | None = None     # None: the quantizer's default (stochastic if unbiased)

    def __post_init__(self):
        k = cb.kind(self.quantizer)
        object.__setattr__(self, "bits", k.check_bits(self.bits))
        if self.bucket_size is None:
            object.__setattr__(self, "bucket_size", k.default_bucket_size)
        if not k.passthrough:
            check_bucket_size(self.bucket_size)
        stochastic_rounding(k, self.rounding)      # validates

    @property
    def stochastic(self) -> bool:
        return stochastic_rounding(cb.kind(self.quantizer), self.rounding)

    @property
    def passthrough(self) -> bool:
        return cb.kind(self.quantizer).passthrough


NONE_LINK = LinkSpec("none", None)


@dataclass(frozen=True)
class Config:
    algorithm: str = "qsgd"
    topology: str = "allgather"
    # compressed / horovod / auto (:mod:`hvd_qadam.exchange`); HVD_QADAM_EXCHANGE, else auto
    exchange: str = dataclasses.field(default_factory=default_exchange)
    uplink: LinkSpec = LinkSpec("qsgdinf")
    downlink: LinkSpec = NONE_LINK          # server -> workers (efficient_adam, qadam, ef_sgd, qadam_weights)
    error_feedback: bool = True             # worker EF on the uplink
    server_error_feedback: bool = True      # server EF on a quantized downlink
    seed: int = 0
    warmup_steps: int = 0                   # uncompressed steps first
    min_compress_numel: int = 1024          # smaller tensors (biases, norms) travel unquantized
                                            # (fp32, or 2 bytes: see passthrough_wire)
    fusion_threshold_bytes: int = 25 << 20  # fp32 bytes per fused buffer
    nonfinite: str | None = None            # None: the algorithm's default_nonfinite
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
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {tuple(ALGORITHMS)}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.topology!r}; choose one of {tuple(TOPOLOGIES)}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {self.exchange!r}; choose one of {tuple(EXCHANGES)}")
        if self.nonfinite is None:
            object.__setattr__(self, "nonfinite", ALGORITHMS[self.algorithm].default_nonfinite)
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
        self._check_algorithm_options()

    def _check_algorithm_options(self):
        """An option only some algorithm reads (``Algorithm.options``) is refused with another; the
        chosen algorithm validates its own and fills in their defaults."""
        alg = ALGORITHMS[self.algorithm]
        for other in ALGORITHMS.values():
            for name in other.options:
                if name not in alg.options and getattr(self, name) is not None:
                    raise ValueError(f"{name} is an option of algorithm {other.name!r}, not {self.algorithm!r}"
                                     + (" (use warmup_steps for uncompressed steps first)"
                                        if name == "freeze_step" else ""))
        for name, value in alg.resolve_options(self).items():
            object.__setattr__(self, name, value)

    def exact_float64(self, compressed: bool) -> bool:
        """Whether float64 parameters of a group keep float64 end to end (buffers, wire values,
        the mean), as Horovod averages them: only where nothing is quantized and nothing but the
        mean is computed, i.e. ``qsgd``'s gradient averaging of an uncompressed group (the small
        tensors' group, or every group with ``quantizer="none"`` and no downlink quantizer).
        Elsewhere the values are quantized from float32, and algorithm state is float32."""
        if not ALGORITHMS[self.algorithm].keeps_float64:
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

"""The algorithms: what a worker sends, what the server makes of the mean, how it is applied.

Every algorithm is one class here and one instance of the same pipeline
(:mod:`hvd_qadam.engine`):

    worker transform W -> uplink quantizer Q_w (+ worker EF) -> mean over workers
      -> server transform S -> downlink (full / Q_s + server EF / quantized weights) -> apply

Notation (per fused group, flat float32 vectors): g_i is worker i's gradient, x the weights
(identical on every replica), e_i / e_s the worker / server error-feedback residuals,
Q(.) a quantizer, N the number of workers, t the 1-based step of the Adam moments. Error feedback,
where on, is ``p = v + e; send Q(p); e = p - Q(p)`` on both links; it is the engine's, not the
algorithm's. Hyper-parameters (lr, betas, eps, weight decay, momentum, ...) are read live from
the wrapped optimizer's param_groups, so lr schedulers work.

Options of the wrapped optimizer that an algorithm does not implement are refused when the
optimizer is built (:meth:`Algorithm.check_optimizer`), never ignored.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import functional as F
from .errors import AlgorithmOptionError  # noqa: F401 - re-exported
from .statekey import ANCHOR, LATENT, MOMENT1, MOMENT2, MOMENTUM, StateKey

OUT_GRAD, OUT_UPDATE, OUT_WEIGHTS = "grad", "update", "weights"
# What happens to a step with NaN/Inf on some rank: every rank raises NonFiniteGradientError, skips
# the step, or hands back non-finite averaged gradients (as Horovod does; qsgd only).
NONFINITE_POLICIES = ("raise", "skip", "propagate")


class Algorithm:
    """One algorithm: its math (the hooks below) and its policy (the class attributes), which the
    rest of the package reads instead of comparing names. A subclass with a new ``name`` becomes
    a choice of ``DistributedOptimizer(algorithm=...)`` by :func:`register`."""
    name = ""
    output = OUT_GRAD        # what the engine's result is: an averaged gradient, an update, weights
    server_ef = True         # server error feedback on a quantized downlink (update-type outputs)
    server_state = False     # the server side S keeps state per served range (not just the mean)
    overlap = True           # the worker side may run from backward hooks (needs only gradients)
    steps_locally = False    # the wrapped optimizer steps on local gradients; exchanges average models
    default_nonfinite = "raise"   # Config.nonfinite when the user does not choose (see Config)
    keeps_float64 = False    # the result is the plain mean of what workers send, so float64 groups
                             # that travel uncompressed can stay float64 (Config.exact_float64)
    options = ()             # Config fields that only this algorithm reads (refused with the others)

    def __init__(self, config):
        self.cfg = config        # the engine's live configuration (Engine.cfg keeps this current)

    def agreed_config(self) -> dict:
        """The configuration every rank must have been built with (checked before the first
        step): ``cfg``, less what the algorithm decides at run time."""
        return self.cfg.as_dict()

    @classmethod
    def resolve_options(cls, config) -> dict:
        """Validate this algorithm's own ``options`` in ``config`` and return {field: value} for
        those whose value follows from others (defaults filled in); called by ``Config``."""
        return {}

    def start(self, eng, params: dict) -> None:
        """Called before the first step with the initial parameters {name: tensor} (identical on
        every rank) and after a reset; state that starts from the weights is made here."""

    def check_optimizer(self, optimizer) -> None:
        """Refuse, at construction, wrapped-optimizer options this algorithm would not honour."""

    def worker(self, eng, g, grad, step):
        """The uplink vector of group ``g`` from its flat gradient (before EF and quantization)."""
        return grad

    def uplink_is_gradient(self, step) -> bool:
        """Whether ``worker`` hands on the flat gradient itself in this step. Then a group that
        travels through Horovod's allreduce can start tensor by tensor from the backward hooks, as
        ``hvd.DistributedOptimizer``'s hooks do, instead of once the whole group is ready."""
        return type(self).worker is Algorithm.worker

    def server(self, eng, g, a: int, b: int, mean, step):
        """The downlink vector of elements [a, b) of group ``g`` from the workers' mean."""
        return mean

    def finish(self, eng, g, result, step):
        """What is applied, from the downlink result of the whole group (every rank)."""
        return result

    def compress_at(self, eng, t: int) -> bool:
        """Whether step t (0-based) exchanges compressed: after the uncompressed warm-up."""
        return t >= self.cfg.warmup_steps

    def restore(self, eng) -> None:
        """Called after ``eng`` loaded a checkpoint (its bank and counters), before the next step."""


def _refuse(alg: str, optimizer, option: str, why: str):
    raise AlgorithmOptionError(f"algorithm {alg!r} does not support {type(optimizer).__name__}({option}): {why}")


class _AdamFamily(Algorithm):
    """Shared option checks and constants of the algorithms that run Adam themselves."""

    def check_optimizer(self, optimizer) -> None:
        for pg in optimizer.param_groups:
            if "betas" not in pg or "eps" not in pg:
                raise AlgorithmOptionError(
                    f"algorithm {self.name!r} runs Adam and reads betas/eps from the wrapped optimizer, but "
                    f"{type(optimizer).__name__} has none; wrap torch.optim.Adam or AdamW, or use "
                    f"algorithm='qsgd' (any optimizer) or 'ef_sgd' (SGD)")
            if pg.get("amsgrad"):
                _refuse(self.name, optimizer, "amsgrad=True", "the max of past second moments is not implemented")

    def constants(self, h: dict, step: int):
        beta1, beta2 = h["betas"]
        decoupled = bool(h.get("decoupled_weight_decay", False))
        return F.adam_constants(step, h["lr"], beta1, beta2, h["eps"], h.get("weight_decay", 0.0), decoupled,
                                self.cfg.bias_correction, bool(h.get("maximize", False)))

    @staticmethod
    def needs_x(h: dict) -> bool:
        return bool(h.get("weight_decay", 0.0))


class QSGD(Algorithm):
    """Quantized gradient averaging; the wrapped optimizer then steps on the average.

        send Q_w(g_i + e_i);  p.grad = (1/N) sum_i Q_w(g_i + e_i);  optimizer.step()

    Any wrapped optimizer works (its options are its own)."""
    name = "qsgd"
    output = OUT_GRAD
    # Like Horovod: every rank's averaged gradient is non-finite, so a GradScaler skips the step
    # on every rank.
    default_nonfinite = "propagate"
    keeps_float64 = True


class EfficientAdam(_AdamFamily):
    """Efficient-Adam: every worker runs Adam on its own gradient, the updates are averaged.

        m_i = b1 m_i + (1 - b1) g_i ;  v_i = b2 v_i + (1 - b2) g_i^2
        u_i = lr m_i_hat / (sqrt(v_i_hat) + eps)   (+ lr wd x for AdamW; Adam's L2 goes into g_i)
        send Q_w(u_i + e_i);  u = (1/N) sum_i Q_w(u_i + e_i)
        x = x - Q_s(u + e_s)                       (two-way quantization, two-way error feedback)

    Moments are per worker (in the optimizer's hvd_qadam state, not ``optimizer.state``)."""
    name = "efficient_adam"
    output = OUT_UPDATE

    def worker(self, eng, g, grad, step):
        h, key = eng.hyper(g.param_group), StateKey.worker(g.index)
        t = eng.counters["worker_adam_step"].get(key.name, 0) + 1
        n, dev = g.numel, grad.device
        m, v = eng.bank.get_or_zeros(key.of(MOMENT1), n, dev), eng.bank.get_or_zeros(key.of(MOMENT2), n, dev)
        m_new, v_new = step.spare(key.of(MOMENT1), n, dev), step.spare(key.of(MOMENT2), n, dev)
        d = eng.scratch(key.of("w"), n, dev)
        F.adam_update(grad, m, v, eng.flat_params(g) if self.needs_x(h) else None, m_new, v_new, d,
                      self.constants(h, t))
        step.worker_adam_step[key.name] = t
        return d


class QAdam(_AdamFamily):
    """Quantized Adam with error feedback: the server runs Adam on the averaged quantized gradient.

        send Q_w(g_i + e_i);  g = (1/N) sum_i Q_w(g_i + e_i)
        m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2 ;  u = lr m_hat / (sqrt(v_hat) + eps) (+ decay)
        x = x - u  (full-precision downlink)   or   x = x - Q_s(u + e_s)  (quantized, server EF)

    The moments live with the server of each shard (every rank under ``allgather``)."""
    name = "qadam"
    output = OUT_UPDATE
    server_state = True      # the server's Adam moments, per shard

    def server(self, eng, g, a, b, mean, step):
        h, key = eng.hyper(g.param_group), StateKey.server(g.index, a)
        t = eng.counters["server_adam_step"].get(key.name, 0) + 1
        n, dev = b - a, mean.device
        m, v = eng.bank.get_or_zeros(key.of(MOMENT1), n, dev), eng.bank.get_or_zeros(key.of(MOMENT2), n, dev)
        m_new, v_new = step.spare(key.of(MOMENT1), n, dev), step.spare(key.of(MOMENT2), n, dev)
        d = eng.scratch(key.of("s"), n, dev)
        x = self._server_weights(eng, g, a, b) if self.needs_x(h) or self.output == OUT_WEIGHTS else None
        F.adam_update(mean, m, v, x, m_new, v_new, d, self.constants(h, t))
        step.server_adam_step[key.name] = t
        return self._finish(eng, g, a, b, d, x, step)

    def _server_weights(self, eng, g, a, b):
        return eng.flat_params(g)[a:b]

    def _finish(self, eng, g, a, b, d, x, step):
        return d


class QAdamWeights(QAdam):
    """Quantized Adam, weight variant: the server keeps full-precision latent weights x_s, runs
    Adam on the averaged quantized gradient and sends the weights quantized (no server EF: the
    latent weights carry the error).

        x_s = x_s - u   (u as in ``qadam``);   x = Q_s(x_s)"""
    name = "qadam_weights"
    output = OUT_WEIGHTS
    server_ef = False

    def _server_weights(self, eng, g, a, b):
        xs = eng.bank.get(StateKey.server(g.index, a, LATENT))
        return eng.flat_params(g)[a:b] if xs is None else xs

    def _finish(self, eng, g, a, b, d, x, step):
        key = StateKey.server(g.index, a, LATENT)
        xs_new = step.spare(key, b - a, d.device)
        F.axpby(x, d, xs_new, 1.0, -1.0)
        return xs_new


class EFSGD(Algorithm):
    """dist-EF-SGD with (early) momentum, the direction of torch.optim.SGD:

        g_i <- g_i + wd x ;  b_i = mu b_i + (1 - dampening) g_i  (b_i = g_i at first)
        u_i = lr (g_i + mu b_i) with nesterov, else lr b_i;  momentum only for the first
        ``momentum_steps`` steps when set (early momentum), plain SGD after
        send Q_w(u_i + e_i);  x = x - Q_s((1/N) sum_i Q_w(u_i + e_i) + e_s)"""
    name = "ef_sgd"
    output = OUT_UPDATE

    def check_optimizer(self, optimizer) -> None:
        for pg in optimizer.param_groups:
            if "momentum" not in pg:
                raise AlgorithmOptionError(f"algorithm 'ef_sgd' reads momentum from the wrapped optimizer, but "
                                           f"{type(optimizer).__name__} has none; wrap torch.optim.SGD")

    def worker(self, eng, g, grad, step):
        h, key = eng.hyper(g.param_group), StateKey.worker(g.index)
        mom = h.get("momentum", 0.0)
        if self.cfg.momentum_steps is not None and eng.step_count >= self.cfg.momentum_steps:
            mom = 0.0
        n, dev = g.numel, grad.device
        buf = eng.bank.get(key.of(MOMENTUM))
        c = F.momentum_constants(h["lr"], mom, h.get("dampening", 0.0), h.get("nesterov", False),
                                 h.get("weight_decay", 0.0), h.get("maximize", False), first=buf is None)
        d = eng.scratch(key.of("w"), n, dev)
        buf_new = step.spare(key.of(MOMENTUM), n, dev) if mom else None
        F.momentum_update(grad, buf, eng.flat_params(g) if c["wd"] else None, buf_new, d, c)
        return d


class LocalSGD(Algorithm):
    """Local SGD (periodic model averaging): workers take ``sync_every`` local steps with the
    wrapped optimizer, then average their model deltas since the last average a:

        send Q_w(x_i - a + e_i);  x = a = a + (1/N) sum_i Q_w(x_i - a + e_i)"""
    name = "local_sgd"
    output = OUT_WEIGHTS
    overlap = False          # the exchange follows the local optimizer step, not backward
    steps_locally = True

    def start(self, eng, params):
        for g in eng.layout.groups:
            key = StateKey.worker(g.index, ANCHOR)
            if eng.bank.get(key) is None:
                eng.bank.set(key, g.flatten(params).clone())

    def worker(self, eng, g, grad, step):
        d = eng.scratch(StateKey.worker(g.index, "w"), g.numel, grad.device)
        F.axpby(eng.flat_params(g), eng.bank.get(StateKey.worker(g.index, ANCHOR)), d, 1.0, -1.0)
        return d

    def finish(self, eng, g, result, step):
        key = StateKey.worker(g.index, ANCHOR)
        anchor = step.spare(key, g.numel, result.device)
        F.axpby(eng.bank.get(key), result, anchor, 1.0, 1.0)
        return anchor


class OnebitAdam(_AdamFamily):
    r"""1-bit Adam (Tang et al. 2021, DeepSpeed's ``OnebitAdam``): full-precision Adam on the
    averaged gradient for a warm-up of ``freeze_step`` steps; then the second moment v is frozen and
    the workers exchange their *momentum*, compressed (1-bit ``sign`` with two-way error feedback
    when ``quantizer="sign"``, ``downlink_quantizer="sign"``).

        input: lr (gamma), betas (b1, b2), eps, weight decay (lambda), freeze step T_f, N workers,
               Q_w / Q_s the uplink / downlink quantizers (identity during the warm-up)
        initialize: m_0 = 0, v_0 = 0, e_i = 0 (worker residuals), e_s = 0 (server residual)
        for t = 1, 2, ...:
            g_i = grad f_i(x_{t-1})  (+ lambda x_{t-1}: Adam's L2 decay)            on worker i
            if t <= T_f or (K > 0 and (t - T_f) % K == 0):   warm-up, or a v refresh: uncompressed
                g   = (1/N) sum_i g_i                                        (fp32) exchange
                m_t = b1 m_{t-1} + (1 - b1) g
                v_t = b2^k v_{t-k} + (1 - b2^k) g^2        (k: steps since v's last update; 1 in warm-up)
                u_t = m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps)
            else:                                            compression stage, v_t = v of its last update
                m_i = b1 m_{t-1} + (1 - b1) g_i                           W: on worker i
                p_i = m_i + e_i;  send Q_w(p_i);  e_i = p_i - Q_w(p_i)
                mbar = (1/N) sum_i Q_w(p_i)                               S: the mean
                m_t = Q_s(mbar + e_s);  e_s = mbar + e_s - m_t         (m_t = mbar, full downlink)
                m_t = 0 where v_{T_v} = 0
                u_t = m_t / (sqrt(v_{T_v} / (1 - b2^{T_v})) + eps)       (0 where v_{T_v} = 0;
                                                               T_v: the step of v's last update)
            x_t = x_{t-1} - lr u_t  (- lr lambda x_{t-1}: AdamW's decoupled decay)    every rank

    m and v are replicated: every rank holds the same m (the averaged, decoded momentum) and v.
    K = ``v_refresh_every`` (0: never, DeepSpeed's 1-bit Adam). Refreshes answer a stale v: Adam's
    own v keeps moving towards the recent g^2 after the freeze (on the 10M-parameter LM, Adam's
    bias-corrected v at step 300 was, coordinate median, 0.68x its value at step 200). 0/1 Adam
    (Lu et al. 2022) likewise updates v only at chosen steps. Here one sampled g^2 stands for the k
    steps v skipped (weight 1 - b2^k), so in expectation v_t is Adam's, and it takes Adam's bias
    correction 1 - b2^t of the current step.
    With ``quantizer="none"`` and T_f beyond the run this is torch.optim.Adam on the mean gradient.

    Bias correction. DeepSpeed's 1-bit Adam corrects neither moment, in either stage. Here the
    warm-up is torch's Adam (``bias_correction=True``, the default, so it equals Adam on the mean
    gradient); after the freeze m is not corrected (DeepSpeed's choice; 1 - b1^t > 0.99997 from
    t = 100 with b1 = 0.9), and v keeps the correction of the step it was frozen at, 1 - b2^{T_f}: a
    frozen raw v would make every step after the freeze 1/sqrt(1 - b2^{T_f}) larger (3.2x at
    T_f = 100, b2 = 0.999) than the one before it. ``bias_correction=False`` is DeepSpeed's rule
    exactly: no correction anywhere.

    Zero second moment. A coordinate whose gradient was exactly 0 through the whole warm-up (an
    embedding row of a token never seen) has v_{T_f} = 0; a 1-bit code cannot say 0, so its decoded
    momentum is +-scale and lr m / eps would throw the weight away. Such coordinates keep m = 0 and
    take no Adam step after the freeze (DeepSpeed asks the user for a "momentum mask" instead).

    The freeze. The warm-up is the engine's uncompressed warm-up (``warmup_steps``, which the
    configuration sets to ``freeze_step``, default 100 = ``DEFAULT_FREEZE_STEP``).
    ``freeze_step="auto"`` decides it at run time: after warm-up step t > K the norm of the
    bias-corrected second moment, n_t = ||v_t / (1 - b2^t)|| over every group, is compared with
    n_{t-K}; when |n_t - n_{t-K}| <= tol n_t, v freezes and step t + 1 is the first compressed one
    (K = ``AUTO_WINDOW``, tol = ``AUTO_TOLERANCE``). v_t comes from the full-precision averaged
    gradient, identical on every rank (and on the ``ps`` server), and n_t is summed sequentially in
    float64, so every rank reaches the same decision without a message. ``warmup_steps``, if given
    with "auto", is the latest freeze step.

    State: m, v (bank, ``g<i>.m`` / ``g<i>.v``), the warm-up Adam step per group and, for "auto", the
    step the freeze starts at and the last K + 1 norms (counters and bank): all checkpointed."""
    name = "onebit_adam"
    output = OUT_UPDATE
    options = ("freeze_step", "v_refresh_every")
    DEFAULT_FREEZE_STEP = 100          # full-precision Adam steps before v is frozen
    DEFAULT_V_REFRESH_EVERY = 50       # steps between uncompressed v refreshes after the freeze
    FREEZE_AUTO_NEVER = 2 ** 62        # freeze_step="auto" without a cap: warm up until v is stable
    AUTO_WINDOW = 20                   # K: compare ||v_hat|| with its value K warm-up steps ago
    AUTO_TOLERANCE = 0.05              # freeze when it changed by at most this fraction
    FREEZE_AT = StateKey.scoped("onebit", "freeze_at").name   # counter: the first compressed step
                                                               # ("auto", once decided)
    NORMS = StateKey.scoped("onebit", "vnorm")   # bank: ring buffer of the last K + 1 norms ("auto")

    def __init__(self, config):
        super().__init__(config)
        self._norms = (None, {})       # (step in flight, {group: sum of v_hat^2}), "auto" only
        # "auto" lowers cfg.warmup_steps to the step it decides; this is the configured one (the cap)
        self._configured_warmup = config.warmup_steps

    @classmethod
    def resolve_options(cls, config) -> dict:
        """The warm-up is the engine's uncompressed warm-up: warmup_steps is derived from
        freeze_step (for "auto", warmup_steps, if given, caps the freeze step; the algorithm lowers
        it at run time when it decides to freeze)."""
        f, k = config.freeze_step, config.v_refresh_every
        if k is None:
            k = cls.DEFAULT_V_REFRESH_EVERY
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"v_refresh_every must be a non-negative integer (0: never refresh v), got {k!r}")
        out = {"v_refresh_every": k}
        if f is None:
            f = cls.DEFAULT_FREEZE_STEP
        if f == "auto":
            if config.warmup_steps == 0:
                out["warmup_steps"] = cls.FREEZE_AUTO_NEVER
        elif isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"freeze_step must be a positive integer or 'auto', got {f!r} (onebit_adam needs "
                             f"full-precision steps to estimate the second moment it freezes)")
        elif config.warmup_steps not in (0, f):
            raise ValueError(f"onebit_adam: warmup_steps={config.warmup_steps} conflicts with freeze_step={f}; its "
                             f"uncompressed warm-up is freeze_step (pass that only)")
        else:
            out["warmup_steps"] = f
        out["freeze_step"] = f
        return out

    @property
    def auto(self) -> bool:
        return self.cfg.freeze_step == "auto"

    def uplink_is_gradient(self, step) -> bool:
        return not step.compress                          # the warm-up sends the gradient

    def worker(self, eng, g, grad, step):
        if not step.compress:
            return grad                                   # warm-up: the gradient itself, in fp32
        h, key = eng.hyper(g.param_group), StateKey.worker(g.index)
        n, dev = g.numel, grad.device
        c = self.constants(h, max(1, eng.counters["worker_adam_step"].get(key.name, 0)))
        out = eng.scratch(key.of("w"), n, dev)
        F.momentum_ema(grad, eng.bank.get_or_zeros(key.of(MOMENT1), n, dev),
                       eng.flat_params(g) if c["l2"] else None, out, c)
        return out

    def finish(self, eng, g, result, step):
        h, key = eng.hyper(g.param_group), StateKey.worker(g.index)
        n, dev = g.numel, result.device
        m, v = eng.bank.get_or_zeros(key.of(MOMENT1), n, dev), eng.bank.get_or_zeros(key.of(MOMENT2), n, dev)
        m_new, d = step.spare(key.of(MOMENT1), n, dev), eng.scratch(key.of("d"), n, dev)
        x = eng.flat_params(g) if self.needs_x(h) else None
        last = eng.counters["worker_adam_step"].get(key.name, 0)     # the Adam step v was last updated at
        if step.compress:          # result: the averaged (decoded) momentum
            F.frozen_adam_apply(result, v, x, m_new, d, self.constants(h, max(1, last)))
            return d
        v_new = step.spare(key.of(MOMENT2), n, dev)
        warm = step.step < self.cfg.warmup_steps                 # warm-up: torch's Adam step
        t = last + 1 if warm else step.step + 1
        c = self.constants(h, t)
        if not warm:               # a v refresh: v has not moved for the t - last steps since
            b2k = h["betas"][1] ** (t - last)
            c["b2"], c["omb2"] = np.float32(b2k), np.float32(1.0 - b2k)
        F.adam_update(result, m, v, x, m_new, v_new, d, c)
        step.worker_adam_step[key.name] = t
        if self.auto and warm:
            self._watch(eng, g, h, t, v_new, step)
        return d

    def agreed_config(self) -> dict:
        return dict(super().agreed_config(), warmup_steps=self._configured_warmup)

    def compress_at(self, eng, t: int) -> bool:
        """Compressed after the freeze, except every ``v_refresh_every``-th step after it (v refreshes)."""
        f, k = self.cfg.warmup_steps, self.cfg.v_refresh_every
        return t >= f and not (k and (t + 1 - f) % k == 0)

    def _watch(self, eng, g, h, t, v_new, step) -> None:
        """freeze_step="auto": after the last group of a warm-up step, decide whether v is stable."""
        if self._norms[0] is not step:
            self._norms = (step, {})
        sums = self._norms[1]
        sums[g.index] = F.sumsq(v_new) / (1.0 - h["betas"][1] ** t) ** 2
        if len(sums) < len(eng.layout.groups):
            return
        k = self.AUTO_WINDOW
        hist = eng.bank.get_or_zeros(self.NORMS, k + 1, "cpu")
        hist_new = step.spare(self.NORMS, k + 1, "cpu")
        hist_new.copy_(hist)
        hist_new[t % (k + 1)] = math.sqrt(sum(sums[i] for i in sorted(sums)))
        if t <= k:
            return
        now, before = float(hist_new[t % (k + 1)]), float(hist_new[(t - k) % (k + 1)])
        if now > 0 and abs(now - before) <= self.AUTO_TOLERANCE * now:
            step.worker_adam_step[self.FREEZE_AT] = step.step + 1
            self._set_warmup(eng, step.step + 1)

    def _set_warmup(self, eng, steps: int) -> None:
        if self.cfg.warmup_steps != steps:
            eng.cfg = dataclasses.replace(self.cfg, warmup_steps=steps)     # the engine's, and so ours

    def restore(self, eng) -> None:
        if self.auto:
            at = eng.counters["worker_adam_step"].get(self.FREEZE_AT)
            self._set_warmup(eng, self._configured_warmup if at is None else at)
        self._norms = (None, {})


ALGORITHMS: dict[str, type] = {}


def register(cls: type) -> type:
    """Make ``cls`` (an :class:`Algorithm` subclass with a new ``name``) a choice of
    ``DistributedOptimizer(algorithm=cls.name)`` and ``Config``; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)) or not cls.name:
        raise TypeError(f"register() takes an Algorithm subclass with a name, got {cls!r}")
    if ALGORITHMS.get(cls.name, cls) is not cls:
        raise ValueError(f"algorithm {cls.name!r} is already registered ({ALGORITHMS[cls.name].__qualname__})")
    if cls.default_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"{cls.__qualname__}.default_nonfinite must be one of {NONFINITE_POLICIES}")
    ALGORITHMS[cls.name] = cls
    return cls


for _cls in (QSGD, EfficientAdam, QAdam, QAdamWeights, EFSGD, LocalSGD, OnebitAdam):
    register(_cls)


def make(config) -> Algorithm:
    return ALGORITHMS[config.algorithm](config)

"""Shared by the hvd_style_*.py scripts (Horovod-example-style training, see tests/test_horovod_compat.py).

``--impl horovod`` uses ``hvd.DistributedOptimizer``; ``--impl hvd_qadam`` makes the one-line swap to
``hvd_qadam.DistributedOptimizer`` with the very same arguments, plus ``--quantizer none`` (full
precision: the run must equal Horovod's) or ``--quantizer default`` (hvd_qadam's defaults), plus any
``--qadam-kwargs`` JSON. Both options take comma-separated lists (``--impl horovod,hvd_qadam
--quantizer none,default``): the runs then follow one another in the same processes, each from
scratch (fresh seed, model, optimizer and loader), which saves the seconds of starting Python, torch
and Horovod on every rank again.

At the end of a run every rank reports its final loss and a digest of its parameters; rank 0 prints
them as one line ``HVD_STYLE_RESULT {json}`` and saves its flat parameters to ``--out`` (with
``{run}`` replaced by the run's name). A run that raises on every rank is reported with its error and
the next run starts; a run that does not end within ``--watchdog`` seconds (a hang: ranks waiting in
different collectives) prints ``HVD_STYLE_HANG``, the stacks of all threads, and exits 124.
"""
import faulthandler
import functools
import hashlib
import json
import os
import sys
import threading
import time
import traceback

import horovod.torch as hvd
import torch


def add_impl_args(parser):
    parser.add_argument("--impl", default="horovod",
                        help="horovod (hvd.DistributedOptimizer), hvd_qadam (the one-line swap), "
                             "or a list: horovod,hvd_qadam")
    parser.add_argument("--quantizer", default="none",
                        help="hvd_qadam only: none (quantizer='none', exact), default (hvd_qadam's defaults), "
                             "or a list")
    parser.add_argument("--qadam-kwargs", default="{}", help="hvd_qadam only: more keyword arguments, JSON")
    parser.add_argument("--out", default=None,
                        help="rank 0 saves its flat final parameters here ({run}: the run's name)")
    parser.add_argument("--watchdog", type=float, default=120, help="seconds a run may take before it counts as hung")
    return parser


def runs(args):
    """The (impl, quantizer) pairs asked for, Horovod first."""
    out = []
    for impl in args.impl.split(","):
        if impl == "horovod":
            out.append(("horovod", "-"))
        elif impl == "hvd_qadam":
            out += [("hvd_qadam", q) for q in args.quantizer.split(",")]
        else:
            raise SystemExit(f"--impl: unknown {impl!r}")
    return out


def run_name(args) -> str:
    return args.impl if args.impl == "horovod" else f"{args.impl}-{args.quantizer}"


def distributed_optimizer_class(args):
    """What ``DistributedOptimizer(...)`` means in the script: Horovod's, or hvd_qadam's with the options."""
    if args.impl == "horovod":
        return hvd.DistributedOptimizer
    import hvd_qadam
    if args.quantizer not in ("none", "default"):
        raise SystemExit(f"--quantizer: unknown {args.quantizer!r}")
    extra = {} if args.quantizer == "default" else {"quantizer": "none"}
    extra.update(json.loads(args.qadam_kwargs))
    return functools.partial(hvd_qadam.DistributedOptimizer, **extra)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def _print_result(args, everyone, case):
    if hvd.rank() == 0:
        print("HVD_STYLE_RESULT " + json.dumps({"run": run_name(args), "impl": args.impl, "quantizer": args.quantizer,
                                                "case": case, "size": hvd.size(), "ranks": everyone}), flush=True)


def report(args, model, loss: float, case=None, **extra):
    """Every rank: loss, parameter digest and norm; rank 0 prints them all as one JSON line."""
    flat = flat_params(model)
    mine = {"rank": hvd.rank(), "loss": float(loss), "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
            "norm": float(flat.double().norm()), **extra}
    everyone = hvd.allgather_object(mine, name="hvd_style.report")
    if hvd.rank() == 0 and args.out:
        torch.save(flat, args.out.format(run=run_name(args) + (f"-{case}" if case else "")))
    _print_result(args, everyone, case)


def run_all(args, main, case=None, skip=None):
    """main(args) for every (impl, quantizer) of the lists, one after the other, under a watchdog
    (but those for which skip(impl, quantizer) is true)."""
    for impl, quantizer in runs(args):
        if skip is not None and skip(impl, quantizer):
            continue
        one = type(args)(**{**vars(args), "impl": impl, "quantizer": quantizer})
        name = run_name(one)
        t0 = time.time()

        def hung(name=name):
            print(f"HVD_STYLE_HANG rank {hvd.rank()} run {name} case {case}: no end after {args.watchdog:.0f} s; "
                  "stacks follow on stderr", flush=True)
            faulthandler.dump_traceback(all_threads=True)
            sys.stderr.flush()
            os._exit(124)

        watchdog = threading.Timer(args.watchdog, hung)
        watchdog.daemon = True
        watchdog.start()
        try:
            main(one)
        except Exception as e:       # every rank raised (else the others hang, and the watchdog ends the job)
            traceback.print_exc()
            everyone = hvd.allgather_object({"rank": hvd.rank(), "error": f"{type(e).__name__}: {e}"},
                                            name="hvd_style.error")
            _print_result(one, everyone, case)
        finally:
            watchdog.cancel()
        if hvd.rank() == 0:
            print(f"HVD_STYLE_TIME run {name} case {case}: {time.time() - t0:.1f} s", flush=True)
        hvd.barrier()

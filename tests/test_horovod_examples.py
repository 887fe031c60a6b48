"""Horovod's own PyTorch examples (v0.28.1), the files users copy, with the one-line swap.

bench/horovod_examples.py fetches them (pinned SHA-256; never part of this project), makes the
swapped copy (``hvd.DistributedOptimizer(`` -> ``hvd_qadam.DistributedOptimizer(`` and ``import
hvd_qadam``, nothing else), writes MNIST's files from real handwritten digits, and runs both under
the same launcher with the same arguments. Here: pytorch_mnist.py under ``mpirun -np 2`` (plain,
``--fp16-allreduce``, ``--gradient-predivide-factor 2``: the swap reaches Horovod's test accuracy;
``--use-adasum``: refused at construction), the synthetic benchmark under ``horovodrun --gloo``,
and both elastic examples under ``horovodrun`` elastic, resized on this host.

Skipped, with the reason, where the examples cannot be had (offline, not cached, no HOROVOD_SRC).
"""
import difflib
import json
import subprocess
import sys

import pytest

from conftest import load_script

hx = load_script("bench/horovod_examples.py")

# Test accuracy of the swap against Horovod's, in percentage points: 297 test digits (one digit is
# 0.34 points). Measured after the 5 epochs: swap 0.68 points below Horovod (fp32 and predivide),
# 0.34 (fp16); Horovod's own fp16 run is 0.68 from its fp32 run, and from one epoch to the next
# the accuracy of either moves by several points at this learning rate.
ACCURACY_TOLERANCE = 3.0
LEARNED = 80.0          # clearly above chance (10 %)


@pytest.fixture(scope="module")
def files():
    try:
        return hx.fetch_examples()
    except hx.ExamplesUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def runner(files, tmp_path_factory):
    return hx.Runner(str(tmp_path_factory.mktemp("horovod_examples")), files)


def _run(runner, name, impls=hx.IMPLS) -> dict:
    case = hx.CASE_BY_NAME[name]
    why = runner.missing(case)
    if why:
        pytest.skip(why)
    return runner.run_both(case, impls)


def _ok(r: dict) -> dict:
    assert r["outcome"] == "ok", f"{r['command']}: {r['outcome']} {r.get('error', '')}\n{r['log_tail']}"
    return r


# ----------------------------------------------------------------------------- without launching

def test_swap_changes_exactly_the_optimizer_line(files):
    """The swapped example differs from Horovod's by the import and the one optimizer line."""
    for name, path in files.items():
        with open(path) as f:
            source = f.read()
        swapped = hx.swap(source, name)
        diff = [line for line in difflib.unified_diff(source.splitlines(), swapped.splitlines(), lineterm="", n=0)
                if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        removed = [line[1:].strip() for line in diff if line[0] == "-"]
        added = [line[1:].strip() for line in diff if line[0] == "+"]
        assert added[0] == "import hvd_qadam", (name, diff)
        assert len(removed) == 1 and removed[0].startswith("optimizer = hvd.DistributedOptimizer("), (name, diff)
        assert added[1:] == [removed[0].replace("hvd.DistributedOptimizer(", "hvd_qadam.DistributedOptimizer(")]


def test_swap_fails_loudly_without_its_pattern():
    with pytest.raises(hx.SwapError, match="exactly one 'hvd.DistributedOptimizer\\('"):
        hx.swap("import horovod.torch as hvd\nopt = hvd_qadam.DistributedOptimizer(o)\n")
    with pytest.raises(hx.SwapError, match="found 2"):
        hx.swap("import horovod.torch as hvd\na = hvd.DistributedOptimizer(o)\nb = hvd.DistributedOptimizer(o)\n")
    with pytest.raises(hx.SwapError, match="import horovod.torch as hvd"):
        hx.swap("import horovod.torch as h\nopt = hvd.DistributedOptimizer(o)\n")


def test_mnist_files_are_read_by_torchvision_without_a_download(runner, tmp_path):
    """torchvision.datasets.MNIST(download=True) finds the written files (this machine has no route
    to MNIST's mirrors: a download attempt would fail) and reads 28x28 digits of all ten classes."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import collections, json, sys\n"
        "from torchvision import datasets, transforms\n"
        "for train in (True, False):\n"
        "    d = datasets.MNIST(sys.argv[1], train=train, download=True, transform=transforms.ToTensor())\n"
        "    x, y = d[0]\n"
        "    counts = collections.Counter(int(t) for t in d.targets)\n"
        "    print(json.dumps({'n': len(d), 'shape': list(x.shape), 'range': [float(x.min()), float(x.max())],\n"
        "                      'classes': len(counts), 'fewest': min(counts.values())}))\n")
    proc = subprocess.run([sys.executable, str(probe), runner.data], capture_output=True, text=True, timeout=180,
                          env=runner.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, test = (json.loads(line) for line in proc.stdout.splitlines())
    assert (train["n"], test["n"]) == (1500, 297)
    for split in (train, test):
        assert split["shape"] == [1, 28, 28] and split["range"][0] == 0.0 and 0.5 < split["range"][1] <= 1.0, split
        assert split["classes"] == 10 and split["fewest"] >= 20, split      # every digit, each well represented


# ----------------------------------------------------------------------------- pytorch_mnist.py under mpirun

@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", ["mnist", "mnist-fp16", "mnist-predivide2"])
def test_mnist_swap_reaches_horovods_accuracy(runner, case):
    """pytorch_mnist.py, ``mpirun -np 2``: the swap's final test accuracy is Horovod's (same
    options), both clearly above chance, and the test loss is of the same size."""
    r = _run(runner, case)
    ref, got = _ok(r["horovod"]), _ok(r["hvd_qadam"])
    assert ref["accuracy"] > LEARNED, f"Horovod itself did not learn: {ref['accuracy_by_epoch']}"
    assert got["accuracy"] > LEARNED, f"the swap did not learn: {got['accuracy_by_epoch']}"
    assert abs(got["accuracy"] - ref["accuracy"]) <= ACCURACY_TOLERANCE, \
        f"{case}: accuracy {got['accuracy']:.2f}% vs Horovod {ref['accuracy']:.2f}% (by epoch: " \
        f"{got['accuracy_by_epoch']} vs {ref['accuracy_by_epoch']})"
    assert got["test_loss"] < 2 * ref["test_loss"] + 0.05, (got["test_loss"], ref["test_loss"])


@pytest.mark.timeout(300)
def test_mnist_use_adasum_is_refused_at_construction(runner):
    """``--use-adasum`` passes op=hvd.Adasum: hvd_qadam refuses it when the optimizer is built
    (before any training), with the reason, and the job fails."""
    r = _run(runner, "mnist-adasum", impls=("hvd_qadam",))["hvd_qadam"]
    assert r["outcome"] == "error", r
    assert hx.ADASUM_REFUSAL in r["error"] and "use op=hvd.Average" in r["error"], r["error"]
    assert "train_loss_first" not in r, "training started before the refusal"


# ----------------------------------------------------------------------------- benchmark under horovodrun --gloo

@pytest.mark.timeout(600)
def test_synthetic_benchmark_under_horovodrun_gloo(runner):
    """pytorch_synthetic_benchmark.py (mobilenet_v3_small, batch 8), ``horovodrun --gloo -np 2``:
    both report img/sec on 2 CPUs."""
    r = _run(runner, "benchmark-gloo")
    for impl in hx.IMPLS:
        res = _ok(r[impl])
        assert res["cpus"] == 2 and res["img_sec_total"] > 0 and res["img_sec_per_cpu"] > 0, res


# ----------------------------------------------------------------------------- elastic examples

@pytest.mark.timeout(600)
def test_mnist_elastic_resized_2_3_2_with_the_swap(runner):
    """pytorch_mnist_elastic.py with the swap under ``horovodrun`` elastic: the discovery script
    grows the job to 3 slots once it trains and shrinks it to 2 once the new rank trains; training
    goes on through both resets (topology auto: allgather at 2 ranks, sharded at 3, chosen again at
    each reset on every rank) and the final test accuracy is clearly above chance."""
    r = _ok(_run(runner, "mnist-elastic-2-3-2", impls=("hvd_qadam",))["hvd_qadam"])
    assert r["resized"] == ["localhost:3", "localhost:2"], r
    assert 2 in r["ranks_seen"], r
    assert r["accuracy"] > LEARNED, r


@pytest.mark.timeout(600)
def test_synthetic_benchmark_elastic_grows_with_the_swap(runner):
    """pytorch_synthetic_benchmark_elastic.py with the swap: grown from 2 to 3 ranks mid-benchmark,
    it ends on 3 CPUs and reports img/sec."""
    r = _ok(_run(runner, "benchmark-elastic-2-3", impls=("hvd_qadam",))["hvd_qadam"])
    assert r["resized"] == ["localhost:3"], r
    assert r["cpus"] == 3 and r["img_sec_total"] > 0, r

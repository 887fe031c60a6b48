"""How the studies (variance_study.py, convergence_3bit.py, toy_convex.py, ...) and benchmarks write
their results: a JSON file and a matplotlib figure, each announced with a line ``wrote PATH``."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path


def write_json(path, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")


@contextlib.contextmanager
def figure(path, nrows: int = 1, ncols: int = 1, **subplots):
    """``with figure(path, 1, 2, figsize=(11, 4)) as (fig, axes):`` draws into a headless
    matplotlib figure, which is laid out and saved to ``path`` when the block ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, **subplots)
    yield fig, axes
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")

"""Summarise scripts/run_horovod_tests.sh results: one row per Horovod test, one column per
implementation (horovod, hvd_qadam), with the reason of every failure.

    python tests/horovod_compat/summarize.py RESULTS_DIR [--json OUT.json]

RESULTS_DIR/<impl>/<test>/ holds rank<R>.xml (pytest junit XML per rank), rank<R>.log and rc
(the exit status of the mpirun launch; 124 = killed by the outer timeout).
"""
import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET


def _reason(text: str) -> str:
    """A one-line summary of a failure: the exception line, plus where it was raised."""
    lines = [ln.rstrip() for ln in (text or "").splitlines() if ln.strip()]
    exc = next((ln for ln in reversed(lines) if re.match(r"^E\s+\S", ln)), None)
    if exc is None:
        exc = next((ln for ln in reversed(lines) if re.search(r"(Error|Exception|Timeout)\b", ln)),
                   lines[-1] if lines else "")
    exc = re.sub(r"^E\s+", "", exc).strip()
    where = [ln for ln in lines if re.match(r"^\S+\.py:\d+: ", ln)]
    loc = ""
    if where:
        m = re.match(r"^(\S+?\.py):(\d+): (\S+)", where[-1])
        if m:
            loc = f" [{os.path.basename(m.group(1))}:{m.group(2)}]"
    return (exc[:300] + loc).strip()


def rank_outcome(xml_path: str):
    root = ET.parse(xml_path).getroot()
    cases = list(root.iter("testcase"))
    if not cases:
        return "error", _reason(root.findtext(".//error") or "no test case ran")
    case = cases[0]
    for tag in ("failure", "error"):
        node = case.find(tag)
        if node is not None:
            return "fail", _reason((node.text or "") + "\n" + (node.get("message") or ""))
    node = case.find("skipped")
    if node is not None:
        return "skip", (node.get("message") or "").strip()[:200]
    return "pass", ""


def test_outcome(test_dir: str):
    rc_path = os.path.join(test_dir, "rc")
    rc = int(open(rc_path).read().strip() or 1) if os.path.exists(rc_path) else None
    ranks = sorted(glob.glob(os.path.join(test_dir, "rank*.log")))
    results = {}
    for log in ranks:
        r = re.search(r"rank(\d+)\.log$", log).group(1)
        xml = os.path.join(test_dir, f"rank{r}.xml")
        if os.path.exists(xml) and os.path.getsize(xml) > 0:
            results[r] = rank_outcome(xml)
        else:
            text = open(log, errors="replace").read()
            if "Timeout" in text or rc == 124:
                stack = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
                inner = [s for s in stack if "pytest_timeout" not in s[0] and "/_pytest/" not in s[0]
                         and "pluggy" not in s[0]]
                where = f" in {os.path.basename(inner[-1][0])}:{inner[-1][1]} {inner[-1][2]}" if inner else ""
                results[r] = ("timeout", f"hung (per-test timeout){where}")
            else:
                results[r] = ("crash", _reason(text[-3000:]) or f"exit {rc}")
    if not results:
        return "missing", f"no output (rc={rc})"
    kinds = {k for k, _ in results.values()}
    if kinds == {"pass"}:
        return "pass", ""
    if kinds == {"skip"}:
        return "skip", next(iter(results.values()))[1]
    # The cause, not its echo: a rank that failed because another one did ("Horovod has been shut
    # down", a timeout while a peer had already failed) comes last.
    def echo(why):
        return "has been shut down" in why or "finished execution" in why
    for pass_ in (False, True):
        for kind in ("fail", "crash", "error", "timeout"):
            for r, (k, why) in sorted(results.items()):
                if k == kind and echo(why) == pass_:
                    return kind, f"rank {r}: {why}"
    return "mixed", "; ".join(f"rank {r}: {k}" for r, (k, _) in sorted(results.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--json")
    args = ap.parse_args()
    impls = [d for d in ("horovod", "hvd_qadam") if os.path.isdir(os.path.join(args.results, d))]
    impls += sorted(d for d in os.listdir(args.results)
                    if os.path.isdir(os.path.join(args.results, d)) and d not in impls)
    tests = []
    for impl in impls:
        for t in sorted(os.listdir(os.path.join(args.results, impl))):
            if t not in tests:
                tests.append(t)
    table = {t: {impl: test_outcome(os.path.join(args.results, impl, t))
                 if os.path.isdir(os.path.join(args.results, impl, t)) else ("-", "")
                 for impl in impls} for t in tests}
    width = max([len(t) for t in tests] + [4])
    print(f"{'test'.ljust(width)}  " + "  ".join(i.ljust(9) for i in impls))
    for t in tests:
        print(f"{t.ljust(width)}  " + "  ".join(table[t][i][0].ljust(9) for i in impls))
    print()
    for t in tests:
        for i in impls:
            kind, why = table[t][i]
            if kind not in ("pass", "-"):
                print(f"{t} [{i}] {kind}: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({t: {i: {"outcome": k, "reason": w} for i, (k, w) in row.items()}
                       for t, row in table.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

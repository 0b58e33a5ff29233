"""Time the README's first command on CPU: ``bash scripts/setup.sh && pear run``.

    python3 benchmarks/run_time_cpu.py                 # setup + pear run, default model and settings
    python3 benchmarks/run_time_cpu.py --skip-setup    # pear run only
    python3 benchmarks/run_time_cpu.py -- --k 8        # extra arguments go to pear run

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python3 benchmarks/run_time_cpu.py --skip-setup \
        --out benchmarks/results/run_time_cpu_avx2.json   # an AVX2-only CPU, simulated

Target: <= 300 s on a 2-core machine. Runs both commands exactly as a user would (subprocess,
fresh Python), into a temporary output folder, and saves
``benchmarks/results/run_time_cpu.json``: wall seconds of setup and of pear run, pear run's
own seconds per stage (from report.md), the proxy-loss figures, the machine (cores, CPU,
load average before and after: other processes on a shared machine slow every stage), and
the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
from pear.hardware import cpu_bf16_flags, cpu_name  # noqa: E402


def _timed(cmd: list[str]) -> float:
    print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return round(time.perf_counter() - t, 2)


def _capability() -> str:
    """PyTorch's CPU kernel level as pear run sees it (a fresh process: the env vars apply)."""
    code = "from pear.hardware import cpu_capability; print(cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO))).stdout.strip()


def _compute_choice() -> dict:
    """What `pear.hardware` picks here (dtype, threads, and why)."""
    code = ("import json; from pear.hardware import choose; c = choose('cpu'); "
            "print(json.dumps({'dtype': c.dtype, 'threads': c.threads, 'reason': c.reason}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()[-200:]}


def _stage_seconds(report: str) -> dict[str, float]:
    part = report.split("## Seconds per stage", 1)[-1].split("##", 1)[0]
    return {m[1].strip(): float(m[2]) for m in re.finditer(r"^\| ([^|]+) \| ([0-9.]+) \|$", part, re.M)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-setup", action="store_true", help="time pear run only")
    ap.add_argument("--out", default=str(RESULTS / "run_time_cpu.json"))
    ap.add_argument("run_args", nargs="*", help="extra arguments for pear run (after --)")
    args = ap.parse_args()

    load_before = os.getloadavg()
    setup_s = None if args.skip_setup else _timed(["bash", "scripts/setup.sh"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run_cmd = ["pear", "run", "--out", str(out), *args.run_args]
        run_s = _timed(run_cmd)
        report = (out / "report.md").read_text()
        coefs = json.loads((out / "coefficients.json").read_text())
        pear_json = json.loads((out / "model" / "pear.json").read_text())
    load_after = os.getloadavg()

    total = round((setup_s or 0) + run_s, 2)
    result = {
        "command": "bash scripts/setup.sh && " + shlex.join(["pear", "run", *args.run_args])
        if setup_s is not None else shlex.join(["pear", "run", *args.run_args]),
        "benchmark_command": shlex.join([sys.executable, "benchmarks/run_time_cpu.py", *sys.argv[1:]]),
        "setup_seconds": setup_s,
        "pear_run_seconds": run_s,
        "total_seconds": total,
        "target_seconds": 300,
        "within_target": total <= 300,
        "stage_seconds": _stage_seconds(report),
        "k": len(coefs["heads"]),
        "coefficients": {f"L{r['layer']}H{r['head']}": round(r["coefficient"], 4) for r in coefs["heads"]},
        "heldout_proxy": {"fit_before": coefs["fit"]["before"], "fit_after": coefs["fit"]["after"],
                          "saved_model": pear_json["pear_run"]["heldout_proxy"]},
        "fit_settings": coefs["fit"]["settings"],
        "compute": _compute_choice(),
        "machine": {"cores": os.cpu_count(), "cpu": cpu_name(), "python": platform.python_version(),
                    "cpu_capability": _capability(), "cpu_flags_bf16": cpu_bf16_flags(),
                    "simulated": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                                  if k in os.environ} or None,
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in load_after]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("command", "setup_seconds", "pear_run_seconds", "total_seconds",
                                             "within_target", "stage_seconds")}, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

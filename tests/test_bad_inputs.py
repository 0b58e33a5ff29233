"""Bad input, every command: one short error, exit != 0, nothing written, the input untouched.

The matrix runs each command (`run`, `discover`, `fit`, `fold`, `eval`, `bench overhead`,
`inspect`) against each bad input that applies to it, in-process on a tiny random model saved
to a folder (every case must fail before a model is loaded, so each takes milliseconds).
Interruptions are real processes: Ctrl-C inside a long C call, Ctrl-C in a fit (which then
resumes), kill -9 inside an atomic save.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pear.bench  # noqa: F401  (imported before load_model is patched: they bind it by name)
import pear.folding.checkpoint  # noqa: F401
import pear.evaluate.runner  # noqa: F401
import pear.inspect  # noqa: F401
import pear.pipeline  # noqa: F401
from pear.cli import main
from pear.discover import discover
from tests.tiny_models import tiny_model

REPO = Path(__file__).resolve().parent.parent
READ_ONLY = Path("/sys/pear-test-out")  # creating anything here fails, even for root


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny llama (2 layers x 4 heads) as a folder, a heads file, a coefficients file, and the
    bad inputs."""
    d = tmp_path_factory.mktemp("bad")
    model = d / "model"
    tiny_model("llama").save_pretrained(model)
    discover(tiny_model("llama"), settings=[(4, 8)], method="exact", progress=False).save(d / "heads.json", plot=False)
    (d / "coefs.json").write_text(json.dumps({"heads": [{"layer": 1, "head": 2, "coefficient": 0.5}]}))
    (d / "random.gguf").write_bytes(os.urandom(4096))
    (d / "empty").mkdir()
    (d / "broken").mkdir()
    (d / "broken" / "config.json").write_text('{"model_type": "llama", ')
    (d / "nan.json").write_text('{"heads": [{"layer": 1, "head": 2, "coefficient": NaN}]}')
    (d / "range.json").write_text('{"heads": [{"layer": 7, "head": 2, "coefficient": 0.5}]}')
    (d / "emptyjson.json").write_text("{}")
    (d / "malformed.json").write_text('{"heads": [')
    (d / "exists.json").write_text("{}\n")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("x")
    (d / "nodata").mkdir()
    return d


def _template(cmd: str, w: Path, out: str) -> list[str]:
    m = str(w / "model")
    return {
        "run": ["run", "--model", m, "--out", out or str(w / "o-run"), "--steps", "1", "--no-progress"],
        "discover": ["discover", "--model", m, "--out", out or str(w / "o-disc.json"), "--no-progress"],
        "fit": ["fit", "--model", m, "--heads", str(w / "heads.json"), "--k", "2", "--out", out or str(w / "o-fit.json")],
        "fold": ["fold", "--model", m, "--coefficients", str(w / "coefs.json"), "--out", out or str(w / "o-fold")],
        "eval": ["eval", "--model", m, "--task", "closedbook", "--limit", "2", "--out", out or str(w / "o-eval.json")],
        "bench": ["bench", "overhead", "--model", m, "--pear", m, "--out", out or str(w / "o-bench.json")],
        "inspect": ["inspect", "--model", m],
    }[cmd]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


MODEL_CASES = {"missing path": "/nonexistent/model", "random-bytes gguf": "random.gguf", "empty folder": "empty",
               "broken config.json": "broken"}
OUT_FILE_CMDS = ["discover", "fit", "eval", "bench"]
OUT_DIR_CMDS = ["run", "fold"]
ALL = ["run", "discover", "fit", "fold", "eval", "bench", "inspect"]


def _cases():
    for cmd in ALL:
        for name, spec in MODEL_CASES.items():
            yield cmd, name, lambda w, a, spec=spec: _set(a, "--model", spec if spec.startswith("/") else str(w / spec))
    for name in ("nan", "range", "emptyjson", "malformed"):
        yield "fold", f"coefficients {name}", lambda w, a, n=name: _set(a, "--coefficients", str(w / f"{n}.json"))
        if name != "nan":
            yield "fit", f"heads {name}", lambda w, a, n=name: _set(a, "--heads", str(w / f"{n}.json"))
    yield "fit", "heads missing", lambda w, a: _set(a, "--heads", str(w / "nope.json"))
    for cmd in ("run", "discover", "fit"):
        yield cmd, "K beyond the heads", lambda w, a: _set(a, "--k", "9")
    yield "run", "top-m beyond the heads", lambda w, a: _set(a, "--top-m", "100")
    yield "run", "garbage discovery settings", lambda w, a: _set(a, "--discovery-settings", "20by50")
    yield "run", "one-sample discovery setting", lambda w, a: _set(a, "--discovery-settings", "1x50")
    yield "discover", "garbage settings", lambda w, a: _set(a, "--settings", "abc")
    yield "discover", "batch-heads 0", lambda w, a: _set(a, "--batch-heads", "0")
    yield "fit", "steps 0", lambda w, a: _set(a, "--steps", "0")
    yield "fit", "negative lr", lambda w, a: _set(a, "--lr", "-1")
    yield "run", "steps 0", lambda w, a: _set(a, "--steps", "0")
    yield "bench", "context 0", lambda w, a: _set(a, "--context", "0")
    yield "eval", "unknown task", lambda w, a: _set(a, "--task", "no-such-task")
    yield "eval", "empty data folder", lambda w, a: _set(a, "--data-dir", str(w / "nodata"))
    yield "eval", "limit 0", lambda w, a: _set(a, "--limit", "0")
    yield "eval", "position out of range", lambda w, a: _set(_set(a, "--task", "mdqa-10"), "--positions", "50")
    yield "eval", "malformed positions", lambda w, a: _set(_set(a, "--task", "mdqa-10"), "--positions", "1,x")
    for cmd in OUT_FILE_CMDS:
        yield cmd, "existing file as --out", lambda w, a: _set(a, "--out", str(w / "exists.json"))
        yield cmd, "folder as --out", lambda w, a: _set(a, "--out", str(w / "full"))
        yield cmd, "read-only --out", lambda w, a: _set(a, "--out", str(READ_ONLY / "x.json"))
    for cmd in OUT_DIR_CMDS:
        yield cmd, "non-empty folder as --out", lambda w, a: _set(a, "--out", str(w / "full"))
        yield cmd, "file as --out", lambda w, a: _set(a, "--out", str(w / "exists.json"))
        yield cmd, "read-only --out", lambda w, a: _set(a, "--out", str(READ_ONLY / "run"))


CASES = list(_cases())


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


class Loaded(Exception):
    """Raised instead of loading a model: the command got past every check."""


def _no_loading(monkeypatch):
    def no_load(*a, **k):
        raise Loaded

    for mod in ("pear.loading", "pear.evaluate.runner", "pear.bench", "pear.inspect", "pear.folding.checkpoint",
                "pear.pipeline"):
        if hasattr(sys.modules[mod], "load_model"):
            monkeypatch.setattr(sys.modules[mod], "load_model", no_load)


@pytest.mark.parametrize("cmd", ALL)
def test_the_good_inputs_pass_every_check(ws, cmd, monkeypatch):
    """The matrix's base command lines are valid: each case fails for its own bad input."""
    _no_loading(monkeypatch)
    with pytest.raises(Loaded):
        main(_template(cmd, ws, ""))


@pytest.mark.parametrize("cmd,name,edit", CASES, ids=[f"{c}-{n}" for c, n, _ in CASES])
def test_bad_input(ws, cmd, name, edit, capsys, monkeypatch):
    _no_loading(monkeypatch)  # every case must be refused before a model is loaded (Loaded fails the test)
    before = _tree_hash(ws)
    argv = edit(ws, _template(cmd, ws, ""))
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0, f"{argv} succeeded"
    assert 1 <= len(err) <= 2 and err[-1].startswith("pear: error: "), err
    assert _tree_hash(ws) == before, "an input changed or an output was written"


def test_no_traceback_but_with_verbose(ws, capsys):
    """-v shows the traceback of the same error; without it, one line."""
    argv = ["inspect", "--model", str(ws / "broken")]
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["-v", *argv]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_os_error_is_one_line_with_the_path(ws, capsys, monkeypatch):
    """An environment error deep inside a command (here: the disk is full while reading the
    heads file) is one line naming the file, exit 2."""
    import pear.heads

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(ws / "heads.json"))

    monkeypatch.setattr(pear.heads, "select_heads", full)
    assert main(_template("fit", ws, str(ws / "o-os.json"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pear: error: No space left on device: {ws / 'heads.json'}"]


def test_truncated_safetensors_is_one_line(ws, tmp_path, capsys):
    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in (ws / "model").iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    assert main(["inspect", "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0], err


# ---------------------------------------------------------------------------- real processes
def _env(**kw):
    return dict(os.environ, PYTHONPATH=str(REPO), **kw)


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell may have started us ignoring it


def test_ctrl_c_inside_a_long_c_call_acts_within_seconds():
    """One long torch call (two 5000 x 5000 float64 products on one thread, ~10 s) does not return
    to the interpreter, like a long backward pass: Python's own handler would wait for it; the
    watcher exits within the grace time."""
    code = ("import torch; torch.set_num_threads(1); a = torch.randn(5000, 5000, dtype=torch.float64)\n"
            "from pear.cli import _watch_interrupts; _watch_interrupts(0.5); print('ready', flush=True); a @ a @ a")
    p = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_sigint_default)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()  # never leave it computing
    assert p.returncode == 130
    assert time.monotonic() - t < 5
    assert err.strip().splitlines() == ["pear: interrupted (in the middle of a computation)"]


def test_ctrl_c_mid_fit_then_resume(ws, tmp_path):
    """Ctrl-C during `pear fit` (a real process): exit 130, one line, no coefficients file; the
    same command then resumes from the checkpoint and finishes."""
    out = tmp_path / "c.json"
    argv = [sys.executable, "-m", "pear.cli", "fit", "--model", str(ws / "model"), "--heads", str(ws / "heads.json"),
            "--k", "2", "--steps", "100000", "--batch", "64", "--length", "40", "--device", "cpu", "--out", str(out)]
    p = subprocess.Popen(argv, env=_env(PEAR_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_sigint_default)
    ckpt = out.with_name(out.name + ".ckpt")
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert ckpt.exists(), "the fit never wrote a checkpoint"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert not out.exists()
    assert ckpt.exists()
    step = torch.load(ckpt, weights_only=False)["step"]
    more = subprocess.run(argv + ["--max-steps-this-run", "3"], env=_env(PEAR_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-500:]
    assert f"resuming fit from {ckpt} at step {step}/" in more.stderr
    assert torch.load(ckpt, weights_only=False)["step"] == step + 3
    assert not out.exists()


def test_kill_9_mid_save_leaves_nothing_complete_and_next_run_cleans(tmp_path):
    """kill -9 inside an atomic folder write: the target never appears; the temporary folder
    (named with the dead process id) is removed by the next write of the same target, whose
    output gets ordinary permissions."""
    target = tmp_path / "model"
    code = ("import sys, time; from pear.atomic import atomic_dir\n"
            f"with atomic_dir({str(target)!r}) as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(b'x' * 100000)\n"
            "    print('ready', flush=True); time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
    finally:
        p.kill()
    p.wait(timeout=30)
    left = [q.name for q in tmp_path.iterdir()]
    assert not target.exists() and len(left) == 1 and left[0].startswith(f".model.tmp-{p.pid}-")

    from pear.atomic import atomic_dir, umask

    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [q.name for q in tmp_path.iterdir()] == ["model"]
    assert (target / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask()
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask()


def test_a_live_writer_is_not_disturbed(tmp_path):
    """Only dead processes' temporary folders are removed: one of a running process stays."""
    from pear.atomic import remove_stale

    mine = tmp_path / f".x.tmp-{os.getpid()}-abc"
    mine.mkdir()
    dead = tmp_path / ".x.tmp-999999999-abc"
    dead.mkdir()
    assert remove_stale(tmp_path / "x") == [dead]
    assert mine.exists() and not dead.exists()


def test_help_imports_no_torch():
    code = "import sys; from pear.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "False"

"""Faults injected for real into real run folders.

Each case breaks something the way the world does (SIGKILL, a torn or bit-flipped file,
a hostile model.json, a full or read-only disk, a bad corpus) and checks what the lab
promises: no code from the folder ran, no finished run was lost or downgraded, the last
complete checkpoint still loads, and the user saw one line.

Training here is a tiny model in this process (forked children are killed), so the many
kill points cost seconds; the command-line cases use the quickstart notebook at smoke.
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from lablib import checkpoints as ckpt
from lablib import io as labio
from lablib.checkpoints import CheckpointError, newest_loadable
from lablib.config import ConfigError, ModelConfig, TrainConfig
from lablib.data import CorpusError, TokenBlocks, check_corpus, prepare_lm_data
from lablib.models import Transformer
from lablib.objectives import CausalLM
from lablib.runs import create_run, open_run, runs_table
from lablib.train import train

torch.set_num_threads(1)  # forked children must not inherit a thread pool
QUICKSTART = str(REPO / "notebooks" / "00_quickstart.ipynb")
BLOCKS = TokenBlocks(torch.randint(4, 30, (64, 17), generator=torch.Generator().manual_seed(0)))
VAL = BLOCKS.eval_batches(1, 4)


def cfg(**kw):
    base = dict(steps=12, batch_size=4, seq_len=16, warmup_steps=2, log_every=1, eval_every=4, checkpoint_every=4,
                learning_rate=3e-3, device="cpu")
    return TrainConfig(**{**base, **kw})


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=16, dropout=0.1))


def train_into(path, seed=0, **kw):
    run = create_run("faults", {}, path)
    train(tiny(seed), CausalLM(), BLOCKS, cfg(**kw), run, val=VAL, progress=False)
    return run


def curve(run):
    rows = open_run(run.path if hasattr(run, "path") else run).log.rows()
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce, and how long training takes (warm)."""
    folder = tmp_path_factory.mktemp("ref")
    train_into(folder / "warm-up")
    t0 = time.perf_counter()
    run = train_into(folder / "run")
    return {"curve": curve(run), "seconds": time.perf_counter() - t0, "path": run.path}


def in_child(fn) -> int:
    """Run fn() in a forked child; returns its pid (the child never returns into pytest)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def resume_matches(path, reference):
    """After a kill: every listed checkpoint is intact, the newest loads, and resuming gives the reference curve."""
    run = open_run(path)
    steps = run.checkpoints()
    if steps:
        assert newest_loadable(path) == steps[-1]  # nothing half-written counts as a checkpoint
        run.load_model()
    # as a notebook does, the model is built afresh: with another seed when a checkpoint must supply the weights
    train(tiny(seed=99 if steps else 0), CausalLM(), BLOCKS, cfg(), run, val=VAL, progress=False)
    assert curve(run) == reference["curve"]
    assert not list((Path(path) / "checkpoints").glob(".step-*"))  # no temporary left behind


# --- SIGKILL ------------------------------------------------------------------------------------


def test_sigkill_at_random_moments_of_training_then_resume_gives_the_uninterrupted_curve(tmp_path, reference):
    rng = np.random.default_rng(0)
    landed = 0
    for attempt in range(60):
        path = tmp_path / f"kill-{attempt}"
        pid = in_child(lambda: train_into(path))
        time.sleep(rng.uniform(0.0, 1.2 * reference["seconds"]))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        landed += os.WIFSIGNALED(status)
        if (path / "params.json").is_file():
            resume_matches(path, reference)
        if landed >= 25:
            break
    assert landed >= 25


class KillAt:
    """Counts file operations of a training run and SIGKILLs the process at number `at` (before, after or mid-way)."""

    def __init__(self, at=None, how="after", fraction=0.5):
        self.at, self.how, self.fraction, self.count = at, how, fraction, 0

    def wrap(self, fn, torn_arg=None):
        def wrapped(*args, **kwargs):
            self.count += 1
            if self.count == self.at and self.how == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*args, **kwargs)
            if self.count == self.at:
                if self.how == "torn" and torn_arg is not None:  # the file reached disk only in part
                    target = Path(args[torn_arg])
                    with open(target, "r+b") as f:
                        f.truncate(int(target.stat().st_size * self.fraction))
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    def install(self, monkeypatch):
        monkeypatch.setattr(ckpt, "save_model", self.wrap(ckpt.save_model, torn_arg=1))
        monkeypatch.setattr(ckpt, "save_file", self.wrap(ckpt.save_file, torn_arg=1))
        monkeypatch.setattr(ckpt, "fsync_file", self.wrap(ckpt.fsync_file))
        monkeypatch.setattr(ckpt, "fsync_dir", self.wrap(ckpt.fsync_dir))
        monkeypatch.setattr(labio, "fsync_dir", self.wrap(labio.fsync_dir))
        monkeypatch.setattr(os, "replace", self.wrap(os.replace))
        monkeypatch.setattr(ckpt.shutil, "rmtree", self.wrap(ckpt.shutil.rmtree))
        monkeypatch.setattr(Path, "unlink", self.wrap(Path.unlink))


def test_sigkill_at_random_points_of_checkpoint_writing_then_resume_gives_the_uninterrupted_curve(
        tmp_path, reference, monkeypatch):
    counter = KillAt()
    with monkeypatch.context() as m:
        counter.install(m)
        train_into(tmp_path / "count")
    n_ops = counter.count
    assert n_ops > 40  # every checkpoint: two tensor files, fsyncs, renames, the optimizer pruning
    rng = np.random.default_rng(1)
    for case in range(30):
        killer = KillAt(at=int(rng.integers(1, n_ops + 1)), how=str(rng.choice(["before", "after", "torn"])),
                        fraction=float(rng.uniform(0, 1)))
        path = tmp_path / f"kill-{case}"

        def victim():
            with monkeypatch.context() as m:
                killer.install(m)
                train_into(path)

        pid = in_child(victim)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"case {case}: op {killer.at} of {n_ops} was not reached"
        resume_matches(path, reference)


# --- damaged checkpoints --------------------------------------------------------------------------


def _damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped bit in the middle: same size, wrong checksum
        data[len(data) // 2] ^= 0x10
        file.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_in_one_line(
        name, how, tmp_path, reference, capfd):
    run = train_into(tmp_path / "run", keep_optimizer=None)
    _damage(run.path / "checkpoints" / "step-000012" / name, how)
    capfd.readouterr()
    model, _ = open_run(run.path).load_model()
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lablib: using checkpoint step 8 of ") and name in err[0]
    expected = tiny()
    ckpt.load_checkpoint(run.path, 8, expected)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    with pytest.raises(CheckpointError, match=f"checkpoint step 12 .* unusable: {name}"):
        open_run(run.path).load_model(step=12)  # asked for by name: refused, not silently replaced
    # resuming also starts from step 8 and still ends on the uninterrupted curve
    train(tiny(seed=5), CausalLM(), BLOCKS, cfg(keep_optimizer=None), open_run(run.path), val=VAL, progress=False)
    assert curve(run) == reference["curve"]


@pytest.mark.parametrize("fault", ["missing", "empty", "not json", "a list", "no files entry", "wrong size"])
def test_a_missing_or_malformed_state_json_makes_the_checkpoint_not_count(fault, tmp_path):
    run = train_into(tmp_path / "run")
    state = run.path / "checkpoints" / "step-000012" / "state.json"
    good = json.loads(state.read_text())
    content = {"missing": None, "empty": "", "not json": "{\"step\": 12,", "a list": "[12]",
               "no files entry": json.dumps({**good, "files": {}}),
               "wrong size": json.dumps({**good, "files": {**good["files"], "model.safetensors":
                                                           {**good["files"]["model.safetensors"], "size": 1}}})}[fault]
    state.unlink() if content is None else state.write_text(content)
    assert open_run(run.path).checkpoints() == [1, 2, 4, 8]
    open_run(run.path).load_model()  # the last complete checkpoint still loads


# --- hostile and damaged model.json ----------------------------------------------------------------

HOSTILE = [
    {"class": "lablib.runs:os.system", "config_class": "lablib.config:ModelConfig", "config": {"command": "touch {s}"}},
    {"class": "lablib.models:torch.load", "config_class": "lablib.config:ModelConfig", "config": {}},
    {"class": "os:system", "config_class": "os:system", "config": {"command": "touch {s}"}},
    {"class": "subprocess:run", "config_class": "lablib.config:ModelConfig", "config": {"args": ["touch", "{s}"]}},
    {"class": "lablib.models:Transformer.__init__.__globals__", "config_class": "lablib.config:ModelConfig",
     "config": {}},
    {"class": "lablib.models:Transformer", "config_class": "builtins:eval", "config": {"source": "open('{s}','w')"}},
    {"model": "__class__", "config": {}},
    {"model": "Transformer.__subclasses__", "config": {}},
    {"model": "os.system", "config": {"command": "touch {s}"}},
    {"model": "lablib.runs:os.system", "config": {}},
    {"model": "HookPoint", "config": {}},  # a lab nn.Module, but not a registered model
    {"model": ["Transformer"], "config": {}},
    {"model": "Transformer", "config": {"__class__": "os.system"}},
    {"model": "Transformer", "config": {"n_layer": "__import__('os').system('touch {s}')"}},
    {"model": "Transformer", "config": {"n_layer": -1}},
    {"model": "Transformer", "config": {"d_model": 3.5}},
    {"model": "Transformer", "config": {"pos": "rope; import os"}},
    {"model": "Transformer", "config": [1, 2]},
    {"model": "Transformer", "config": {"mask": {"__reduce__": "os.system"}}},
    {"model": "Transformer", "config": {"vocab_size": 30, "n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 16,
                                        "dropout": 0.1, "d_mlp": 10**9}},  # valid, but 4e10 bytes: never allocated
    {"model": "Transformer", "config": {"vocab_size": 30, "n_layer": 3, "n_head": 2, "d_model": 16, "max_seq_len": 16}},
    "nested",
    "huge",
    "not json",
]


# typing evaluates the lab's own field annotations ("int | None"); file content must never be evaluated
TYPE_NAMES = {"int", "float", "str", "bool", "None", "Literal", "Any", "ClassVar", "dict", "list", "tuple"}


def only_annotations(sources) -> bool:
    codes = [src if not isinstance(src, str) else compile(src, "<evaluated>", "eval") for src in sources]
    return all(set(code.co_names) <= TYPE_NAMES for code in codes)


@pytest.mark.parametrize("case", range(len(HOSTILE)))
def test_hostile_model_json_is_refused_in_one_line_and_runs_no_code(case, tmp_path, reference, monkeypatch):
    run_path = tmp_path / "run"
    shutil.copytree(reference["path"], run_path)
    sentinel = tmp_path / "pwned"
    spec = HOSTILE[case]
    if spec == "nested":
        text = '{"model": "Transformer", "config": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif spec == "huge":
        text = json.dumps({"model": "Transformer", "config": {"n_layer": 1}, "pad": "x" * (2 << 20)})
    elif spec == "not json":
        text = '{"model": "Transformer", '
    else:
        text = json.dumps(spec).replace("{s}", str(sentinel))
    (run_path / "model.json").write_text(text)
    imported = []
    real_import = __import__
    monkeypatch.setattr("builtins.__import__", lambda name, *a, **k: imported.append(name) or real_import(name, *a, **k))
    calls, evaluated = [], []
    for target in ("os.system", "os.popen", "os.execv", "subprocess.run", "subprocess.Popen"):
        monkeypatch.setattr(target, lambda *a, _t=target, **k: calls.append(_t))
    for name, real in (("eval", eval), ("exec", exec)):  # typing evaluates the lab's own annotations ("int")
        monkeypatch.setattr(f"builtins.{name}", lambda src, *a, _real=real, **k: evaluated.append(src) or _real(src, *a, **k))
    modules_before = set(sys.modules)
    with pytest.raises(ConfigError) as e:
        open_run(run_path).load_model()
    monkeypatch.undo()
    message = str(e.value)
    assert "\n" not in message and str(run_path / "model.json") in message and len(message) < 400
    assert not sentinel.exists() and calls == []
    assert only_annotations(evaluated)
    assert set(sys.modules) == modules_before  # nothing was imported by name from the file
    assert not [m for m in imported if m not in sys.modules]


def test_a_missing_model_json_is_one_line(tmp_path, reference):
    shutil.copytree(reference["path"], tmp_path / "run")
    (tmp_path / "run" / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.json"):
        open_run(tmp_path / "run").load_model()


# --- metrics.jsonl ------------------------------------------------------------------------------


def test_torn_and_garbage_metrics_lines_are_skipped_and_resume_still_matches(tmp_path, reference):
    path = train_into(tmp_path / "run", keep_optimizer=None).path
    with open(path / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\nnull\n42\n{"step": "x"}\n\xff\xfe garbage\n' + b"[" * 50_000 + b'\n{"step": 13, "lo')
    run = open_run(path)
    rows = run.log.rows()
    assert all(isinstance(r, dict) for r in rows) and rows[-1] == {"step": "x"}
    assert len(run.metrics()) == len(rows)
    # a resume truncates to the checkpoint and carries on as if nothing happened
    for p in (path / "checkpoints").iterdir():
        if p.name == "step-000012":
            shutil.rmtree(p)
    train(tiny(seed=3), CausalLM(), BLOCKS, cfg(keep_optimizer=None), run, val=VAL, progress=False)
    assert [r for r in curve(run) if r[0] != "x"] == reference["curve"]


# --- a full or read-only disk -----------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` at folder (root only); yields False where it cannot be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill_and_train(path: Path):
    run = create_run("faults", {}, path)
    try:
        train(tiny(), CausalLM(), BLOCKS, cfg(steps=40, checkpoint_every=4, keep_optimizer=None), run, val=VAL,
              progress=False)
    except OSError:  # ENOSPC from an atomic write, or EFBIG under RLIMIT_FSIZE
        return "OSError"
    except Exception as e:  # safetensors reports a full disk as its own error
        return type(e).__name__
    return None


def test_a_full_disk_stops_training_and_the_last_complete_checkpoint_still_loads(tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, "160k") as mounted:
        if mounted:
            error = _fill_and_train(disk / "run")
        else:  # no tmpfs: a size limit per file in a child (RLIMIT_FSIZE), the closest a user can get
            import resource

            def child():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
                _fill_and_train(disk / "run")
            os.waitpid(in_child(child), 0)
            error = "limited"
        assert error is not None, "the disk never filled"
        run = open_run(disk / "run")
        assert run.checkpoints(), "not even one checkpoint fitted"
        assert newest_loadable(run.path) == run.checkpoints()[-1]
        run.load_model()
        assert not list((run.path / "checkpoints").glob(".step-*"))


@contextlib.contextmanager
def read_only(folder: Path):
    """Make folder read-only for this process: a read-only bind mount as root, chmod otherwise."""
    if os.geteuid() == 0:
        ok = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True)
        if ok.returncode != 0:
            pytest.skip("cannot make a folder read-only for root here")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def lablib(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lablib.cli", *args], capture_output=True, text=True, env=env)


def test_read_only_run_folders_and_runs_roots_are_refused_in_one_line(tmp_path, reference):
    root = tmp_path / "runs"
    shutil.copytree(reference["path"], root / "quickstart" / "done")
    with read_only(root):
        fresh = lablib("run", QUICKSTART, "--preset", "smoke", env={"LABLIB_RUNS": str(root)})
        resumed = lablib("run", QUICKSTART, "--resume", str(root / "quickstart" / "done"))
        open_run(root / "quickstart" / "done").load_model()  # reading a read-only run works
    for proc in (fresh, resumed):
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("lablib: error: run folder ") and "is not writable" in line


# --- the command line on finished runs ------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished quickstart run at smoke, made once; tests work on copies."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    proc = lablib("run", QUICKSTART, "--preset", "smoke", "--quiet", "-p", "sample_tokens", "5", "--run-dir",
                  str(folder))
    assert proc.returncode == 0, proc.stderr
    return folder


def record(folder: Path) -> dict:
    return {name: digest(folder / name) for name in ("notebook.ipynb", "params.json", "results.json")}


def copy_of(finished, tmp_path) -> Path:
    folder = tmp_path / "runs" / "quickstart" / "copy"
    shutil.copytree(finished, folder)
    return folder


def assert_unharmed(folder: Path, before: dict):
    assert record(folder) == before
    run = open_run(folder)
    assert run.state() == "done" and run.status["status"] == "done"
    run.load_model()


def test_a_finished_run_is_not_touched_by_a_run_with_other_parameters(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    before = record(folder)
    proc = lablib("run", QUICKSTART, "--preset", "smoke", "-p", "steps", "31", "--run-dir", str(folder))
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "was made with other parameters: " in line and "steps=30 (now 31)" in line
    assert_unharmed(folder, before)
    assert sorted(p.name for p in folder.glob("notebook*")) == ["notebook.ipynb"]


def test_a_resume_whose_checkpoints_are_all_damaged_is_refused_before_the_kernel(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    before = record(folder)
    _damage(folder / "checkpoints" / "step-000030" / "model.safetensors", "truncate")
    proc = lablib("run", QUICKSTART, "--resume", str(folder))
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "no usable checkpoint" in line and "step 30" in line and "model.safetensors" in line
    assert_unharmed(folder, before)


def test_a_failed_rerun_of_a_finished_run_leaves_its_record_and_puts_its_notebook_beside(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    tokenizer = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_text("{")  # the re-run fails inside the kernel
    before = record(folder)
    proc = lablib("run", QUICKSTART, "--resume", str(folder), "--quiet")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lablib: cell ") and "the finished run" in last and "is unchanged" in last
    (folder / "tokenizer.json").write_bytes(tokenizer)
    assert_unharmed(folder, before)
    assert (folder / "notebook.attempt-2.ipynb").is_file()
    assert open_run(folder).status["attempt"]["status"] == "failed"


def test_a_rerun_of_a_finished_run_killed_midway_leaves_its_record(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    before = record(folder)
    proc = subprocess.Popen([sys.executable, "-m", "lablib.cli", "run", QUICKSTART, "--resume", str(folder), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and "attempt" not in json.loads((folder / "status.json").read_text()):
        time.sleep(0.05)  # the kernel has reopened the run: SIGKILL it in the middle of its work
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert_unharmed(folder, before)
    again = lablib("run", QUICKSTART, "--resume", str(folder), "--quiet")  # and it can still be re-run
    assert again.returncode == 0, again.stderr
    assert open_run(folder).state() == "done" and "attempt" not in open_run(folder).status


def test_damaged_params_json_is_one_line_for_resume_and_listing(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    for content in ("", "{not json", "[1, 2]"):
        (folder / "params.json").write_text(content)
        proc = lablib("run", QUICKSTART, "--resume", str(folder))
        assert proc.returncode == 2
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("lablib: error: --resume ") and "params.json" in line
    table = runs_table(root=tmp_path / "runs")
    assert table.loc[0, "status"] == "unreadable"
    (folder / "params.json").unlink()
    proc = lablib("run", QUICKSTART, "--resume", str(folder))
    assert proc.returncode == 2 and "expected a run folder with params.json" in proc.stderr


# --- corpora --------------------------------------------------------------------------------------

BAD_CORPORA = {
    "empty": (b"", "is empty"),
    "blank": (b"\n \n\t\n", "is empty"),
    "binary": (bytes(range(256)) * 10, "is binary"),
    "undecodable": ("déjà vu\n".encode("latin-1") * 100, "is not UTF-8 text"),
    "cut in a character": (("ok " * 100 + "é").encode()[:-1], "ends inside a UTF-8 character"),
    "tiny": (b"x = 1\n", "fewer than one training block"),
}


@pytest.mark.parametrize("name", sorted(BAD_CORPORA))
def test_corpora_that_cannot_train_are_refused_before_the_kernel(name, tmp_path, isolated_runs):
    content, message = BAD_CORPORA[name]
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        check_corpus(str(corpus), seq_len=64)
    if name in ("empty", "binary"):  # and through the command line: exit 2, one line, no run folder
        proc = lablib("run", QUICKSTART, "--preset", "smoke", "-p", "corpus", str(corpus))
        assert proc.returncode == 2
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("lablib: error: corpus file ") and message in line
        assert not isolated_runs.exists()


@pytest.mark.parametrize("kind", ["one block", "one small file", "a huge line", "folder of tiny files"])
def test_any_local_corpus_holding_a_block_trains(kind, tmp_path):
    corpus = tmp_path / "corpus"
    if kind == "one block":
        corpus.write_text("y" * 16)  # + <eos>: exactly seq_len + 1 tokens
    elif kind == "one small file":
        corpus.write_text("def f(x):\n    return x * 2\n" * 300)
    elif kind == "a huge line":
        corpus.write_text("token " * 500_000)  # 3 MB without a newline
    else:
        corpus.mkdir()
        for i in range(5):
            (corpus / f"{i}.txt").write_text(f"doc {i} ")
    check_corpus(str(corpus), seq_len=16, max_chars=200_000)
    data = prepare_lm_data(str(corpus), "char", seq_len=16, max_chars=200_000)
    assert len(data.train) >= 1 and len(data.val) >= 1
    run = create_run("faults", {}, tmp_path / "run")
    model = Transformer(ModelConfig(vocab_size=data.tokenizer.vocab_size, n_layer=1, n_head=2, d_model=16,
                                    max_seq_len=16))
    train(model, CausalLM(), data.train, cfg(steps=4, log_every=1), run, val=data.val.eval_batches(1, 4),
          progress=False)
    assert np.isfinite(run.metrics()["loss"].dropna()).all()
    open_run(run.path).load_model()

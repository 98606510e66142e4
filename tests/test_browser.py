"""The checkpoint explorer in a real browser: JupyterLab on 127.0.0.1 driven through Debian's Chromium.

Everything is started here and stopped here: a JupyterLab server in its own process
group with its own config, runtime and root folders; the kernels it started; a
training process for the live test; and Chromium through Playwright. Marked
`browser` (run by .ci/run; `pytest -m "not browser"` skips it).

Two JupyterLabs: this environment's, and a plain one from another environment (a
fresh venv holding jupyterlab only) that finds the lab's kernel where
`lablib kernel --user` put it, as a researcher's own JupyterLab would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]

# A tiny causal LM trained for real, checkpoints on the log-spaced schedule; `pace` seconds
# of sleep per step make a run slow enough to watch live.
TRAIN_TINY_RUN = textwrap.dedent('''
    import time, torch
    from lablib.config import ModelConfig, TrainConfig
    from lablib.data import TokenBlocks, char_tokenizer
    from lablib.models import Transformer
    from lablib.objectives import CausalLM
    from lablib.runs import create_run
    from lablib.train import train

    def train_tiny_run(path, steps, checkpoint_every, pace=0.0):
        text = "def add(a, b):\\n    return a + b\\n\\nclass Point:\\n    x = 0\\n" * 20
        tok = char_tokenizer([text])
        ids = torch.tensor(tok.encode(text))
        blocks = TokenBlocks(ids[: len(ids) // 17 * 17].reshape(-1, 17))
        run = create_run("browser", {"steps": steps}, path)
        tok.save(run.path / "tokenizer.json")
        model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=32))
        cfg = TrainConfig(steps=steps, batch_size=8, seq_len=16, warmup_steps=1, log_every=1, eval_every=2,
                          checkpoint_every=checkpoint_every, learning_rate=3e-3, device="cpu", compile="off",
                          num_threads=1)
        pacing = [(1, lambda step, model: time.sleep(pace))] if pace else []
        train(model, CausalLM(), blocks, cfg, run, val=blocks.eval_batches(1, 8), callbacks=pacing, progress=False)
        return run
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook(path: Path, *cells: str) -> Path:
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": c, "outputs": [], "execution_count": None}
                    for c in cells],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def start_lab(base: Path, python: str, env: dict[str, str]):
    """A JupyterLab server of `python`'s environment on 127.0.0.1 with a token, in `base`.

    Returns (server process, base url, token, root folder, runtime folder, log file).
    """
    root, runtime, config = base / "root", base / "runtime", base / "config"
    settings = config / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    for folder in (root, runtime, config / "labconfig", settings):
        folder.mkdir(parents=True)
    # no "news" toast over the notebook, and no kernel-picker dialog: start the notebook's own kernel
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"autoStartDefaultKernel": True}))
    port, token = free_port(), secrets.token_hex(16)
    env = {**env, "JUPYTER_RUNTIME_DIR": str(runtime), "JUPYTER_CONFIG_DIR": str(config),
           "LABLIB_RUNS": str(root / "runs"), "OMP_NUM_THREADS": "1"}
    log = open(base / "jupyter.log", "w")
    server = subprocess.Popen(
        [python, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
         f"--LabApp.workspaces_dir={base / 'workspaces'}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return server, url, token, root, runtime, log
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                kill_group(server)
                raise RuntimeError(f"JupyterLab did not start; see {base / 'jupyter.log'}")
            time.sleep(0.5)


def stop_lab(server: subprocess.Popen, runtime: Path, log) -> None:
    """Stop the server and the kernels it started (found by its runtime folder: they run in their own sessions)."""
    import psutil

    kernels = [p for p in psutil.process_iter(["pid", "cmdline"])
               if any(str(runtime) in part for part in (p.info["cmdline"] or []))]
    kill_group(server)
    for proc in kernels:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    log.close()


def need_chromium() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server of this environment; yields (base url, token, root folder)."""
    need_chromium()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    server, url, token, root, runtime, log = start_lab(tmp_path_factory.mktemp("lab"), sys.executable, env)
    try:
        yield url, token, root
    finally:
        stop_lab(server, runtime, log)


@pytest.fixture(scope="module")
def other_lab(tmp_path_factory):
    """A plain JupyterLab from another environment (a fresh venv holding jupyterlab only), after
    `lablib kernel --user` put the lab's kernel in the user's Jupyter data folder, which both share."""
    need_chromium()
    base = tmp_path_factory.mktemp("other-lab")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # pip from this environment installs into the other one (no pip bootstrap needed there)
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "jupyterlab"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run([python, "-c", "import lablib"], capture_output=True, env=bare, cwd=base).returncode != 0
    data = base / "user-data"  # stands for ~/.local/share/jupyter
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "JUPYTER_PATH")}
    env.update(JUPYTER_DATA_DIR=str(data), LABLIB_PRESET="smoke",
               PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "lablib.cli", "kernel", "--user"], env=env, check=True, capture_output=True)
    listed = json.loads(subprocess.run([python, "-m", "jupyter", "kernelspec", "list", "--json"], env=env, check=True,
                                       capture_output=True, text=True).stdout)["kernelspecs"]
    assert listed["lablib"]["spec"]["display_name"] == "Python (lablib)"
    server, url, token, root, runtime, log = start_lab(base, python, env)
    try:
        yield url, token, root
    finally:
        stop_lab(server, runtime, log)


@pytest.fixture
def page(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1800})
            pg.set_default_timeout(180_000)  # generous: CI machines can be slow and shared
            yield pg
            pg.screenshot(path=str(tmp_path / "last-view.png"))  # for a failure's post-mortem
        finally:
            browser.close()


def open_and_run(page, lab, name: str, screenshots: Path, ready: str = ".lablib-explorer .lablib-step") -> None:
    url, token, _ = lab
    page.goto(f"{url}/lab/tree/{name}?token={token}&reset")  # reset: no tabs restored from an earlier test
    try:
        page.wait_for_selector(".jp-Notebook .jp-Cell")
        page.get_by_text("Kernel status: Idle").first.wait_for(state="attached")
        time.sleep(3)  # let the widget manager finish connecting to the new kernel ("model not found" otherwise)
        for _ in range(5):  # a click that lands before the kernel's session is connected runs nothing: retry
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            try:
                page.wait_for_function("() => [...document.querySelectorAll('.jp-InputPrompt')]"
                                       ".some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))", timeout=10_000)
                break
            except Exception:
                continue
        page.wait_for_selector(ready)
    except Exception:
        page.screenshot(path=str(screenshots / f"{name}-failed.png"))
        raise


def step_text(page) -> str:
    return page.inner_text(".lablib-explorer .lablib-step")


def heatmap(page, view: str) -> tuple[int, str] | None:
    """(rows, content) of the heatmap the plotly div in `view` draws; None until it draws one.

    Plotly sends numpy arrays base64-encoded ({dtype, bdata, shape}); the encoded string
    stands for the content.
    """
    return page.evaluate(f"""() => {{
        const z = document.querySelector('.lablib-explorer .{view} .js-plotly-plot')?.data?.[0]?.z;
        if (!z) return null;
        return z.bdata ? [Number(String(z.shape).split(',')[0]), z.bdata] : [z.length, JSON.stringify(z)];
    }}""")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_explorer_in_jupyterlab_follows_slider_and_prompt(lab, page, tmp_path):
    _, _, root = lab
    notebook(root / "explore.ipynb",
             TRAIN_TINY_RUN + "run = train_tiny_run('runs/tiny', steps=8, checkpoint_every=4)",
             "from widgets.explorer import CheckpointExplorer\n"
             "explorer = CheckpointExplorer(run.path, prompt='def add(a, b):', poll_interval=0.5)\nexplorer")
    open_and_run(page, lab, "explore.ipynb", tmp_path)
    wait_for(lambda: "step 8" in step_text(page), 60, "the explorer to open on step 8")
    wait_for(lambda: heatmap(page, "lablib-attention"), 60, "the attention heatmap to be drawn")
    attention_before, lens_before = heatmap(page, "lablib-attention"), heatmap(page, "lablib-lens")
    assert attention_before[0] == len("def add(a, b):")

    page.focus(".lablib-explorer .noUi-handle")
    page.keyboard.press("Home")  # first checkpoint
    wait_for(lambda: "step 1 " in step_text(page) + " ", 30, "the step label to say step 1")
    assert page.inner_text(".lablib-explorer .widget-readout") == "1"
    wait_for(lambda: heatmap(page, "lablib-lens") != lens_before, 30, "the logit lens to change")
    assert heatmap(page, "lablib-attention") != attention_before

    prompt = page.locator(".lablib-prompt textarea")
    prompt.fill("class Point:")
    prompt.press("Tab")  # the box sends its value when it loses focus
    wait_for(lambda: heatmap(page, "lablib-attention")[0] == len("class Point:"), 30,
             "the attention heatmap to redraw for the new prompt")
    page.locator(".lablib-explorer").screenshot(path=str(tmp_path / "explorer.png"))
    assert (tmp_path / "explorer.png").stat().st_size > 10_000


def test_checkpoints_of_a_run_training_in_another_process_reach_the_slider(lab, page, tmp_path):
    from lablib.checkpoints import list_checkpoints

    _, _, root = lab
    run_dir = root / "runs" / "live"
    run_dir.mkdir(parents=True)  # the explorer opens first and waits for the run's first checkpoint
    notebook(root / "live.ipynb", "from widgets.explorer import CheckpointExplorer\n"
                                  f"CheckpointExplorer({str(run_dir)!r}, prompt='x = 0', poll_interval=0.5)")
    open_and_run(page, lab, "live.ipynb", tmp_path)
    wait_for(lambda: "no checkpoint yet" in step_text(page), 60, "the explorer to wait for a checkpoint")
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAIN_TINY_RUN + f"train_tiny_run({str(run_dir)!r}, steps=60, checkpoint_every=10, pace=0.2)"],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # for each checkpoint: when it appeared on disk, and when the slider's newest step reached it
        on_disk: dict[int, float] = {}
        in_slider: dict[int, float] = {}
        deadline = time.monotonic() + 150
        while (trainer.poll() is None or set(on_disk) - set(in_slider)) and time.monotonic() < deadline:
            now = time.monotonic()
            for step in list_checkpoints(run_dir):
                on_disk.setdefault(step, now)
            label = step_text(page)
            if "newest" in label:
                newest = int(label.rsplit("newest", 1)[1].split()[0])
                for step in on_disk:
                    if step <= newest:
                        in_slider.setdefault(step, time.monotonic())
            time.sleep(0.1)
        delays = {s: round(in_slider[s] - on_disk[s], 2) for s in sorted(in_slider)}
        print("seconds from checkpoint on disk to the slider:", delays)
        assert trainer.returncode == 0
        assert sorted(in_slider) == list_checkpoints(run_dir) == [1, 2, 4, 8, 10, 20, 30, 40, 50, 60]
        # generous: the explorer polls every 0.5 s and takes well under a second to redraw on an idle
        # machine; a shared CI machine can be many times slower
        assert max(delays.values()) < 30.0
        page.screenshot(path=str(tmp_path / "live.png"))
    finally:
        kill_group(trainer)


def test_quickstart_runs_in_another_environments_jupyterlab_with_the_labs_kernel(other_lab, page, tmp_path):
    url, token, root = other_lab
    shutil.copy(REPO / "notebooks" / "00_quickstart.ipynb", root / "00_quickstart.ipynb")
    open_and_run(page, other_lab, "00_quickstart.ipynb", tmp_path, ready=".jp-Notebook .jp-Cell")
    wait_for(lambda: list((root / "runs" / "quickstart").glob("*/results.json")), 600,
             "the quickstart's results.json (every cell ran)")
    sessions = json.loads(urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=5).read())
    assert [s["kernel"]["name"] for s in sessions] == ["lablib"]
    wait_for(lambda: "Python (lablib)" in page.inner_text(".jp-NotebookPanel-toolbar"), 30,
             "the toolbar to name the lab's kernel")
    results = json.loads(next((root / "runs" / "quickstart").glob("*/results.json")).read_text())
    assert results["final_val_loss"] < results["initial_val_loss"]
    page.screenshot(path=str(tmp_path / "quickstart.png"))


def test_an_imported_pythia_shaped_model_opens_in_the_explorer(lab, page, tmp_path):
    from test_hf_import import pythia_shaped, save_tokenizer

    _, _, root = lab
    source = tmp_path / "pythia-tiny"
    for seed, revision in enumerate(["step0", "step4"]):
        pythia_shaped(seed).save_pretrained(str(source / revision))
        save_tokenizer(source / revision)
    run_dir = root / "runs" / "pythia"
    subprocess.run([sys.executable, "-m", "lablib.cli", "import-hf", str(source), "--run-dir", str(run_dir)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    prompt = "def f(x):"
    from lablib.runs import open_run

    n_tokens = len(open_run(run_dir).tokenizer().encode(prompt))
    notebook(root / "pythia.ipynb", "from widgets.explorer import CheckpointExplorer\n"
                                    f"CheckpointExplorer({str(run_dir)!r}, prompt={prompt!r}, poll_interval=0.5)")
    open_and_run(page, lab, "pythia.ipynb", tmp_path)
    wait_for(lambda: "step 4" in step_text(page), 60, "the explorer to open on the newest revision")
    wait_for(lambda: heatmap(page, "lablib-attention"), 60, "the attention heatmap to be drawn")
    assert heatmap(page, "lablib-attention")[0] == n_tokens
    lens_before = heatmap(page, "lablib-lens")
    page.focus(".lablib-explorer .noUi-handle")
    page.keyboard.press("Home")  # the step0 revision
    wait_for(lambda: "step 0 " in step_text(page) + " ", 30, "the step label to say step 0")
    wait_for(lambda: heatmap(page, "lablib-lens") != lens_before, 30, "the logit lens to change")
    page.locator(".lablib-explorer").screenshot(path=str(tmp_path / "pythia-explorer.png"))

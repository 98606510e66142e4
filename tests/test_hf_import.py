"""GPT-NeoX (Pythia) import: logits equal transformers' GPTNeoXForCausalLM, and `lablib import-hf` builds a run.

The GPT-NeoX models are small random ones built from a GPTNeoXConfig with Pythia's
layout (partial rotary 0.25, parallel residual, untied head); nothing is downloaded.
Tolerance 1e-4 in fp32, as for GPT-2 (tests/test_gpt2.py): a wrong q/k/v grouping, a
rotary share off by one channel pair or a sequential residual each move logits by far more.
"""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lablib.interp.analysis import CheckpointModel  # noqa: E402
from lablib.config import ConfigError  # noqa: E402
from lablib.hf_import import from_neox, import_run, load_neox, qkv_to_lab, revision_folders  # noqa: E402
from lablib.runs import open_run  # noqa: E402

ATOL = 1e-4
VOCAB = 320  # above the tokenizer's 256 byte tokens and merges


def pythia_shaped(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=10000,
                    use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
                    bos_token_id=0, eos_token_id=0)
    settings.update(overrides)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**settings)).eval()


def tokens(batch=3, length=19):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def save_tokenizer(folder):
    """A small byte-level BPE with Pythia's end-of-text token, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_imported_model_has_neox_logits(parallel, rotary_pct):
    hf = pythia_shaped(use_parallel_residual=parallel, rotary_pct=rotary_pct)
    lab = from_neox(hf)
    assert lab.cfg.parallel_residual is parallel and lab.cfg.rope_fraction == rotary_pct
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(lab(x), hf(x).logits, atol=ATOL, rtol=0)


def test_qkv_regrouping_puts_each_heads_q_k_v_in_the_labs_blocks():
    n_head, head = 2, 3
    rows = torch.arange(3 * n_head * head)  # NeoX: [h0 q0..2 k0..2 v0..2 | h1 ...]
    lab = qkv_to_lab(rows, n_head)
    assert lab[:head].tolist() == [0, 1, 2] and lab[head:2 * head].tolist() == [9, 10, 11]  # q of h0, q of h1
    assert lab[2 * n_head * head:2 * n_head * head + head].tolist() == [6, 7, 8]  # v of h0


def test_variants_the_lab_cannot_express_are_refused():
    with pytest.raises(ConfigError, match="attention_bias"):
        from_neox(pythia_shaped(attention_bias=False))
    with pytest.raises(ConfigError, match="hidden_act"):
        from_neox(pythia_shaped(hidden_act="quick_gelu"))


@pytest.fixture
def pythia_revisions(tmp_path):
    """A folder of Pythia-style revisions (step0/, step4/), each a save_pretrained folder with a tokenizer."""
    root = tmp_path / "pythia-tiny"
    for seed, name in enumerate(["step0", "step4"]):
        folder = root / name
        pythia_shaped(seed).save_pretrained(str(folder))
        save_tokenizer(folder)
    return root


def test_load_neox_reads_a_saved_folder(pythia_revisions):
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(str(pythia_revisions / "step4"), dtype=torch.float32).eval()
    lab = load_neox(pythia_revisions / "step4")
    with torch.no_grad():
        torch.testing.assert_close(lab(tokens()), hf(tokens()).logits, atol=ATOL, rtol=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_neox(pythia_revisions)


def test_import_builds_a_run_the_analysis_tools_open(pythia_revisions, tmp_path):
    run_dir = import_run(pythia_revisions, run_dir=tmp_path / "run")
    run = open_run(run_dir)
    assert run.checkpoints() == [0, 4]
    assert run.params["revisions"] == {"step0": 0, "step4": 4}
    explorer_model = CheckpointModel(run)
    for step, seed in ((0, 0), (4, 1)):
        hf = pythia_shaped(seed)
        with torch.no_grad():
            torch.testing.assert_close(explorer_model.at(step)(tokens()), hf(tokens()).logits, atol=ATOL, rtol=0)
    analysis = explorer_model.analyze(4, "def f(x):\n    return x")
    assert analysis.attention.shape[0] == 2 and len(analysis.tokens) > 3


def test_revisions_pick_and_name_checkpoints(pythia_revisions, tmp_path):
    assert list(revision_folders(pythia_revisions, ["step4"])) == ["step4"]
    with pytest.raises(ConfigError, match="step9 not in"):
        revision_folders(pythia_revisions, ["step9"])


def test_import_hf_command_line(pythia_revisions, tmp_path):
    out = subprocess.run([sys.executable, "-m", "lablib.cli", "import-hf", str(pythia_revisions), "--revisions",
                          "step4", "--run-dir", str(tmp_path / "cli-run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str((tmp_path / "cli-run").resolve())
    assert json.loads((tmp_path / "cli-run" / "model.json").read_text())["config"]["rope_fraction"] == 0.25
    bad = subprocess.run([sys.executable, "-m", "lablib.cli", "import-hf", str(tmp_path / "nowhere")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def test_a_hugging_face_cache_folder_gives_its_refs_as_revisions(pythia_revisions, tmp_path):
    import shutil

    cache = tmp_path / "models--EleutherAI--pythia-tiny"
    for name, commit in (("step0", "a1"), ("step4", "b2"), ("main", "b2")):
        (cache / "refs").mkdir(parents=True, exist_ok=True)
        (cache / "refs" / name).write_text(commit + "\n")
        if not (cache / "snapshots" / commit).exists():
            shutil.copytree(pythia_revisions / name.replace("main", "step4"), cache / "snapshots" / commit)
    assert revision_folders(cache) == {"main": cache / "snapshots" / "b2", "step0": cache / "snapshots" / "a1",
                                       "step4": cache / "snapshots" / "b2"}
    run = open_run(import_run(cache, ["step0", "main"], run_dir=tmp_path / "run"))
    assert run.params["revisions"] == {"step0": 0, "main": 1}  # an unnumbered revision comes after the others
    assert run.checkpoints() == [0, 1]

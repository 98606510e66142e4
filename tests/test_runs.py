import json

import pytest
import torch

from lablib.config import ConfigError, ModelConfig
from lablib.checkpoints import save_checkpoint
from lablib.data import char_tokenizer
from lablib.experiments.quickstart import LMConfig
from lablib.models import Transformer
from lablib.runs import MetricsLog, create_run, list_runs, open_run, runs_table, start_run


def test_metrics_are_readable_while_a_line_is_half_written(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "loss": 2.0})
    with open(log.path, "a") as f:
        f.write('{"step": 2, "lo')  # the writer is mid-line
    assert log.rows() == [{"step": 1, "loss": 2.0}]


def test_truncate_after_drops_rows_past_the_resume_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for s in range(5):
        log.append({"step": s})
    log.truncate_after(2)
    assert [r["step"] for r in log.rows()] == [0, 1, 2]


def test_open_run_gives_params_metrics_checkpoints_and_the_model(tmp_path):
    run = create_run("demo", {"lr": 0.1}, tmp_path / "demo" / "r1")
    tok = char_tokenizer(["abc"])
    tok.save(run.path / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, d_model=8, max_seq_len=4))
    run.save_model_spec(model)
    save_checkpoint(run.path, 3, model)
    run.log.append({"step": 3, "loss": 1.5})

    again = open_run(run.path)
    assert {k: v for k, v in again.params.items() if k != "provenance"} == {"experiment": "demo", "lr": 0.1}
    assert again.metrics()["loss"].tolist() == [1.5]
    assert again.checkpoints() == [3]
    loaded, loaded_tok = again.load_model()
    x = torch.tensor([loaded_tok.encode("abca")])
    assert torch.equal(loaded(x), model.eval()(x))
    assert again.state() == "running"


def test_model_classes_come_only_from_the_registry(tmp_path):
    run = create_run("demo", {}, tmp_path / "r")
    (run.path / "model.json").write_text(json.dumps({"class": "os:system", "config_class": "os:getcwd", "config": {}}))
    with pytest.raises(ConfigError, match=r"model.json: class 'os:system' is not a lab model class"):
        run.build_model()
    (run.path / "model.json").write_text(json.dumps({"model": "Transformer", "config": {"n_layr": 2}}))
    with pytest.raises(ConfigError, match=r"model.json: 'n_layr' is not a field of ModelConfig"):
        run.build_model()


def test_model_json_names_the_registered_class_and_its_config_fields(tmp_path):
    run = create_run("demo", {}, tmp_path / "r")
    run.save_model_spec(Transformer(ModelConfig(vocab_size=10, n_layer=1, n_head=1, d_model=8, max_seq_len=4)))
    spec = json.loads((run.path / "model.json").read_text())
    assert spec["model"] == "Transformer" and set(spec["config"]) == set(ModelConfig.fields_by_name())
    assert run.build_model().cfg == ModelConfig(vocab_size=10, n_layer=1, n_head=1, d_model=8, max_seq_len=4)


def test_a_run_folder_in_the_format_before_the_registry_still_loads(tmp_path):
    """model.json as the lab wrote it before: `module:Class` names and a whole experiment config."""
    from safetensors.torch import save_model

    cfg = LMConfig.resolve("smoke", vocab_size=12)
    torch.manual_seed(0)
    model = Transformer(cfg.project(ModelConfig))
    run = create_run("quickstart", cfg.to_dict(), tmp_path / "old")
    (run.path / "model.json").write_text(json.dumps(
        {"class": "lablib.models:Transformer", "config_class": "lablib.lm:LMConfig", "config": cfg.to_dict()}, indent=2))
    folder = run.path / "checkpoints" / "step-000030"
    folder.mkdir(parents=True)
    save_model(model, str(folder / "model.safetensors"))
    (folder / "state.json").write_text(json.dumps({"step": 30, "tokens": 100}))  # no checksums then
    loaded, _ = open_run(run.path).load_model()
    x = torch.randint(0, 12, (1, 8))
    assert open_run(run.path).checkpoints() == [30]
    assert torch.equal(loaded(x), model.eval()(x))


def test_results_mark_the_run_done_and_tables_list_runs(tmp_path):
    run = create_run("demo", {"preset": "smoke"}, tmp_path / "runs" / "demo" / "r1")
    run.write_results({"final_val_loss": 1.25, "note": "text is not a table column"})
    assert run.status["status"] == "done"
    assert [r.path for r in list_runs(root=tmp_path / "runs")] == [run.path]
    table = runs_table(root=tmp_path / "runs")
    assert table.loc[0, "result.final_val_loss"] == 1.25 and table.loc[0, "status"] == "done"


def test_a_run_whose_process_is_gone_shows_as_stopped(tmp_path):
    run = create_run("demo", {}, tmp_path / "r")
    run.set_status("running", pid=2**22 + 12345)  # no such process
    assert run.state() == "stopped"


def test_start_run_refuses_to_resume_with_other_parameters(tmp_path):
    cfg = LMConfig.resolve("smoke")
    start_run("quickstart", cfg, tmp_path / "r")
    start_run("quickstart", cfg, tmp_path / "r")  # same parameters: fine
    with pytest.raises(ConfigError, match=r"made with other parameters: steps=30 \(now 31\)"):
        start_run("quickstart", LMConfig.resolve("smoke", steps=31), tmp_path / "r")

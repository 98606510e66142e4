"""Corr2Cause: the generator against the PC route, class-disjoint splits, the text format, packing and scoring."""

import itertools

import numpy as np
import pytest
import torch

from lablib.config import ConfigError, ModelConfig
from lablib.experiments import corr2cause as exp
from lablib.models import Transformer
from lablib.seeding import seeded_model
from lablib.tasks import corr2cause as task


def test_dag_counts_match_the_known_sequence():
    # labelled DAGs on n nodes: 1, 3, 25, 543, 29281 (OEIS A003024); equivalence classes: 2, 11, 185, 8782 (A046951)
    assert [len(task.all_dags(n)) for n in (2, 3, 4, 5)] == [3, 25, 543, 29281]
    assert [len(task.equivalence_classes(n)) for n in (2, 3, 4, 5)] == [2, 11, 185, 8782]


@pytest.mark.parametrize("n", [3, 4, 5])
def test_labels_agree_with_the_pc_route_on_every_item(n):
    classes = task.equivalence_classes(n)
    rng = np.random.default_rng(n)
    checked = 0
    for m in rng.choice(len(classes), min(len(classes), 150), replace=False):
        group = task.class_items(classes, int(m))
        names, labels = task.pc_labels(group[0].premise)
        assert names == task.default_names(n)
        assert labels.tolist() == np.array([it.label for it in group]).reshape(labels.shape).tolist()
        checked += len(group)
    assert checked >= {3: 198, 4: 900, 5: 9000}[n]


def test_sampled_six_variable_classes_agree_with_the_pc_route():
    classes = task.equivalence_classes(6, sample=40)
    assert len(classes) == 40 and len(set(classes.keys)) == 40
    for m in range(0, 40, 4):
        _, labels = task.pc_labels(task.class_items(classes, m)[0].premise)
        assert (labels == classes.labels[m]).all()


def test_d_separation_tables_equal_networkx_on_each_representative():
    classes = task.equivalence_classes(4)
    for m in range(0, len(classes), 7):
        assert (task.d_separation_table(classes.representatives[m]) == classes.separated[m]).all()


def test_every_dag_of_a_class_shares_its_independencies():
    dags = task.all_dags(4)
    keys = task.class_keys(dags)
    by_key = {}
    for adj, key in zip(dags, keys):
        by_key.setdefault(key, []).append(task.d_separation_table(adj))
    for tables in itertools.islice(by_key.values(), 60):
        assert all((t == tables[0]).all() for t in tables)


def test_relations_on_a_hand_made_graph():
    # A -> C <- B, C -> D, E -> A, E -> B   (names A..E = 0..4)
    adj = np.zeros((1, 5, 5), dtype=bool)
    for i, j in [(0, 2), (1, 2), (2, 3), (4, 0), (4, 1)]:
        adj[0, i, j] = True
    rel = dict(zip(task.pairs(5), task.relations_of_dags(adj)[0]))
    parent, child, ancestor, descendant, collider, confounder = range(6)
    assert rel[(0, 2)][parent] and not rel[(0, 2)][ancestor]
    assert rel[(0, 3)][ancestor] and not rel[(0, 3)][parent]
    assert rel[(2, 4)][descendant] and not rel[(2, 4)][child]
    assert rel[(0, 1)][collider] and rel[(0, 1)][confounder]
    assert not rel[(2, 3)][collider] and not rel[(2, 3)][confounder]


def test_splits_are_disjoint_by_class_and_cover_every_split():
    for n in (4, 5):
        classes = task.equivalence_classes(n)
        split = {name: set(task.class_indices(classes, name)) for name in task.SPLIT_FRACTIONS}
        assert sum(map(len, split.values())) == len(classes)
        for a, b in itertools.combinations(split.values(), 2):
            assert not a & b
        assert all(split.values())
    test = task.items([4], "test")
    train_premises = {task.class_items(task.equivalence_classes(4), int(m))[0].premise
                      for m in task.class_indices(task.equivalence_classes(4), "train")}
    assert not {g[0].premise for g in test} & train_premises


def test_text_format_is_the_papers():
    classes = task.equivalence_classes(3)
    adj = np.zeros((3, 3), dtype=bool)
    adj[0, 2] = adj[1, 2] = True  # A -> C <- B
    m = list(classes.keys).index(f"3:{task.class_keys(adj[None])[0].hex()}")
    group = task.class_items(classes, m)
    assert group[0].premise == (
        "Suppose there is a closed system of 3 variables, A, B and C. All the statistical relations among these 3 "
        "variables are as follows: A correlates with C. B correlates with C. However, A is independent of B.")
    assert [it.hypothesis for it in group[:6]] == [
        "A directly causes B.", "B directly causes A.", "A causes something else which causes B.",
        "B causes something else which causes A.",
        "There exists at least one collider (i.e., common effect) of A and B.",
        "There exists at least one confounder (i.e., common cause) of A and B."]
    assert [it.label for it in group[:6]] == [False, False, False, False, True, False]
    chain = task.premise(task.d_separation_table(np.eye(4, k=1, dtype=bool)), task.default_names(4))
    assert "A and C are independent given B." in chain and "A and D are independent given B and C." in chain
    five = task.premise(task.d_separation_table(np.zeros((5, 5), dtype=bool)), task.default_names(5))
    assert "A and B are independent given C, D and E." in five and "However" not in five


def test_renamed_and_paraphrased_sets_keep_the_classes_and_labels():
    original, renamed, paraphrased = (task.items([4], "test", style, max_classes=5) for style in task.STYLES)
    for a, b, c in zip(original, renamed, paraphrased):
        assert [it.label for it in a] == [it.label for it in b] == [it.label for it in c]
        assert b[0].premise != a[0].premise and not set(task.default_names(4)) & set(b[0].hypothesis.split())
        assert c[0].premise == a[0].premise
        assert {it.hypothesis for it in c}.isdisjoint(it.hypothesis for it in a)
    with pytest.raises(ValueError, match="style"):
        task.items([4], "test", "shuffled")


def test_task_tokenizer_keeps_phrases_whole_and_spells_unseen_words():
    tok = task.task_tokenizer()
    strings = tok.token_strings(tok.encode("A correlates with B. Hypothesis: A directly causes B. Valid? Yes"))
    assert strings[:4] == ["A", "correlates_with", "B", "."] and strings[-1] == "Yes"
    assert tok.unk_id not in tok.encode("Xa and Yb have a common cause.")


def tiny_model(tokenizer, seed=0):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=512, pos="rope")
    return seeded_model(Transformer, cfg, seed)


def test_packed_probabilities_equal_one_item_answers():
    tok = task.task_tokenizer()
    model = tiny_model(tok)
    groups = task.items([3, 4], "test", max_classes=2)
    packed = task.valid_probabilities(model, tok, groups, batch_size=3, per_row=5)
    flat = task.flatten(groups)
    alone = np.array([task.answer(model, tok, it.premise, it.hypothesis) for it in flat])
    assert np.allclose(packed, alone, atol=1e-5)


def test_scores_on_known_predictions():
    s = task.binary_scores(np.array([1, 1, 0, 0, 0], bool), np.array([1, 0, 1, 0, 0], bool))
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == 0.5 and s["accuracy"] == 0.6
    assert task.binary_scores(np.array([1, 0], bool), np.zeros(2, bool))["f1"] == 0.0
    flat = task.flatten(task.items([3, 4], "test", max_classes=3))
    labels = np.array([it.label for it in flat])
    table = task.score_table(flat, labels)
    assert set(table) == {"all", *task.RELATIONS, "N=3", "N=4"}
    assert table["all"]["f1"] == 1.0 and all(row["accuracy"] == 1.0 for row in table.values())
    assert table["Is-Parent"]["items"] == sum(it.relation == 0 for it in flat)
    assert 0.4 < task.best_threshold(np.array([0, 0, 1, 1], bool), np.array([0.1, 0.4, 0.6, 0.9])) <= 0.6
    assert task.chance_f1(0.2) == pytest.approx(2 * 0.2 * 0.5 / 0.7)


def test_answer_loss_trains_the_answer_tokens_only():
    tok = task.task_tokenizer()
    model = tiny_model(tok)
    cfg = exp.Corr2CauseConfig.resolve("smoke")
    data = exp.prepare_data(cfg)
    batch = exp.ClassBatches(cfg, data, tok).batch(0, 3, 0)
    loss, metrics = exp.AnswerLoss()(model, batch, None)
    assert metrics["tokens_scored"] == len(batch["labels"]) and torch.isfinite(loss)
    yes, no = task.answer_ids(tok)
    answers = batch["tokens"][batch["answer_row"], batch["answer_pos"] + 1]
    assert ((answers == yes) == batch["labels"]).all() and ((answers == yes) | (answers == no)).all()


def test_training_batches_are_a_function_of_seed_and_index():
    cfg = exp.Corr2CauseConfig.resolve("smoke")
    data = exp.prepare_data(cfg)
    b = exp.ClassBatches(cfg, data, task.task_tokenizer())
    assert torch.equal(b.batch(3, 4, 1)["tokens"], b.batch(3, 4, 1)["tokens"])
    assert not torch.equal(b.batch(3, 4, 1)["tokens"][:, :20], b.batch(4, 4, 1)["tokens"][:, :20]) or \
        not torch.equal(b.batch(3, 4, 1)["labels"], b.batch(4, 4, 1)["labels"])
    test_premises = {g[0].premise for g in data.sets["test"]}
    rows = b.rows(np.random.default_rng(0), 50)
    assert not {r[0].premise for r in rows} & test_premises


def test_curriculum_rows_use_the_short_sizes_first():
    cfg = exp.Corr2CauseConfig.resolve("smoke", curriculum_sizes=[3], curriculum_steps=5)
    data = exp.prepare_data(cfg)
    b = exp.ClassBatches(cfg, data, task.task_tokenizer())
    assert {it.n for s in range(5) for row in b.rows(np.random.default_rng(s), 4, s) for it in row} == {3}
    assert len({it.n for s in range(40) for row in b.rows(np.random.default_rng(s), 1, 5) for it in row}) > 1


def test_bad_parameters_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="train_sizes"):
        exp.Corr2CauseConfig.resolve("smoke", train_sizes=[1, 7])
    with pytest.raises(ConfigError, match="seeds"):
        exp.Corr2CauseConfig.resolve("smoke", seeds=[0, 0])
    with pytest.raises(ConfigError, match="curriculum_sizes"):
        exp.Corr2CauseConfig.resolve("smoke", curriculum_sizes=[5], curriculum_steps=3)


def test_headline_dict_has_intervals_and_paired_differences():
    h = exp.headline_dict("test F1", {0: 0.5, 1: 0.6, 2: 0.7}, {"chance": {0: 0.2, 1: 0.2, 2: 0.2},
                          "untrained": {0: 0.0, 1: 0.1, 2: 0.0}, "trivial": {0: 0.3, 1: 0.3, 2: 0.3},
                          "PC oracle": {0: 1.0, 1: 1.0, 2: 1.0}}, "hypothesis-only", "test")
    assert h["value"]["n"] == 3 and h["value"]["low"] < 0.6 < h["value"]["high"]
    assert h["baselines"]["trivial_rule"] == "hypothesis-only" and "PC oracle" in h["baselines"]["others"]
    assert h["differences"]["trivial"]["mean"] == pytest.approx(0.3) and h["differences"]["trivial"]["low"] > 0
    assert h["differences"]["PC oracle"]["high"] < 0


def test_run_command_names_the_notebook_preset_and_parameters():
    assert exp.run_command("cpu", {"seeds": [0, 1, 2], "pretrained_run": "runs/quickstart/x"}) == (
        "lablib run notebooks/07_corr2cause.ipynb --preset cpu -p pretrained_run runs/quickstart/x -p seeds '[0, 1, 2]'")

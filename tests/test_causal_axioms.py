"""The causal-transitivity task: labels, evaluation sets, the text interface and answer scoring."""

import math
import re

import networkx as nx
import numpy as np
import pytest
import torch

from lablib.config import ConfigError
from lablib.runs import create_run, open_run
from lablib.experiments.causal_axioms import (AnswerLoss, CausalAxiomsConfig, TransitivityBatches, build_model,
                                              evaluation_sets, largest_chain, longest_name, train_model,
                                              training_examples, training_groups)
from lablib.tasks.causal_axioms import (ALPHABET, answer, answer_log_probs, ask, branching_dag, encode_answered,
                                        encode_examples, encode_packed, is_evaluation_graph, linear_chain,
                                        question_prompt, task_tokenizer, trim_padding)


def small_config(**overrides):
    return CausalAxiomsConfig.resolve("smoke", **overrides)


def random_graphs(n_graphs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n_graphs):
        if i % 2:
            yield branching_dag(rng, int(rng.integers(2, 13)), float(rng.choice([1.4, 2.0])))
        else:
            yield linear_chain(rng, int(rng.integers(2, 21)), float(rng.random()),
                               str(rng.choice(["chain", "reversed", "shuffled"])))


def test_reachability_matches_networkx_on_thousands_of_random_graphs():
    for graph in random_graphs(3000):
        g = graph.to_networkx()
        expected = np.array([[b != a and graph.names[b] in nx.descendants(g, graph.names[a])
                              for b in range(graph.n_nodes)] for a in range(graph.n_nodes)])
        np.testing.assert_array_equal(graph.reachability(), expected, err_msg=graph.premises())


def test_question_labels_match_networkx_paths():
    rng = np.random.default_rng(1)
    for i, graph in enumerate(random_graphs(2000, seed=1)):
        example = ask(rng, graph, label=bool(i % 2))
        g = graph.to_networkx()
        assert example.label == nx.has_path(g, graph.names[example.a], graph.names[example.b])
        assert example.a != example.b


def test_branching_graphs_are_dags_with_the_papers_edge_count():
    rng = np.random.default_rng(2)
    for n, factor in [(5, 1.4), (8, 1.4), (10, 2.0), (12, 2.0)]:
        graph = branching_dag(rng, n, factor)
        assert nx.is_directed_acyclic_graph(graph.to_networkx())
        assert len(graph.edges) == int(factor * n)


def test_node_names_are_distinct_one_to_three_alphanumerics():
    for graph in random_graphs(500, seed=3):
        assert len(set(graph.names)) == graph.n_nodes
        assert all(re.fullmatch(r"[A-Za-z0-9]{1,3}", name) for name in graph.names)
        assert not {"Yes", "No"} & set(graph.names)  # an answer word as a name would read ambiguously


def test_text_interface_reads_premises_then_question():
    graph = linear_chain(np.random.default_rng(4), 3)
    a, b, c = graph.names
    assert graph.premises() == f"{a} causes {b}. {b} causes {c}."
    example = ask(np.random.default_rng(0), graph, label=True)
    assert example.prompt == question_prompt(graph.premises(), graph.names[example.a], graph.names[example.b])
    assert example.prompt.endswith(f"Does {graph.names[example.a]} cause {graph.names[example.b]}? ")
    assert example.answer == "Yes"


def test_reversed_order_states_the_chain_backwards():
    graph = linear_chain(np.random.default_rng(5), 4, order="reversed")
    assert graph.edges == ((2, 3), (1, 2), (0, 1))


def test_evaluation_sets_are_balanced_and_sized():
    cfg = small_config(eval_examples=20, eval_chain_lengths=[7, 20], reversed_lengths=[3, 9],
                       branching_nodes=[5, 12], branching_factors=[1.4, 2.0])
    sets = evaluation_sets(cfg)
    assert set(sets) == {"in_distribution", "chain", "reversed", "branch_1.4", "branch_2"}
    assert list(sets["chain"]) == [7, 20] and list(sets["in_distribution"]) == [3, 4, 5, 6]
    for name, by_size in sets.items():
        for n, examples in by_size.items():
            assert len(examples) == 20, (name, n)
            assert sum(e.label for e in examples) == 10, (name, n)
            assert all(e.graph.n_nodes == n for e in examples), (name, n)


def test_evaluation_sets_are_the_same_for_every_run():
    cfg = small_config()
    first, second = evaluation_sets(cfg), evaluation_sets(small_config(seed=5, pos="rope"))
    assert [e.prompt for e in first["chain"][7]] == [e.prompt for e in second["chain"][7]]


def test_evaluation_graphs_never_appear_in_training():
    cfg = small_config(eval_examples=100)
    eval_keys = {e.graph.key() for by_size in evaluation_sets(cfg).values() for ex in by_size.values() for e in ex}
    train = training_examples(np.random.default_rng(6), cfg, 5000)
    train_keys = {e.graph.key() for e in train}
    assert all(is_evaluation_graph(e.graph) for by_size in evaluation_sets(cfg).values()
               for ex in by_size.values() for e in ex)
    assert not any(is_evaluation_graph(e.graph) for e in train)
    assert not eval_keys & train_keys


def test_training_batches_are_reproducible_balanced_and_padded():
    cfg = small_config(questions_per_graph=1)
    tok = task_tokenizer()
    source = TransitivityBatches(cfg, tok)
    batch = source.batch(3, 16, seed=7)
    assert torch.equal(batch["tokens"], source.batch(3, 16, seed=7)["tokens"])
    assert not torch.equal(batch["tokens"], source.batch(4, 16, seed=7)["tokens"])
    assert batch["tokens"].shape == (16, cfg.seq_len + 1)
    answers = [tok.decode(row[mask].tolist()) for row, mask in zip(batch["tokens"], batch["answer_mask"])]
    assert sorted(answers) == ["No"] * 8 + ["Yes"] * 8
    texts = [tok.decode([t for t in row.tolist() if t != tok.pad_id]) for row in batch["tokens"]]
    assert all(t.endswith(("? Yes", "? No")) for t in texts)


@pytest.mark.parametrize("kind", ["char", "paper"])
@pytest.mark.parametrize("pos", ["none", "learned", "sinusoidal", "rope"])
def test_packed_questions_score_exactly_like_single_questions(kind, pos):
    cfg = small_config(tokenizer=kind, pos=pos)
    tok = task_tokenizer(kind)
    model = build_model(cfg, tok).eval()
    groups = training_groups(np.random.default_rng(3), cfg, 5, 4)
    packed = encode_packed(tok, groups)
    flat = [e for group in groups for e in group]
    single = encode_answered(tok, flat)
    with torch.no_grad():
        loss_packed, m_packed = AnswerLoss()(model, packed, torch.Generator())
        loss_single, m_single = AnswerLoss()(model, single, torch.Generator())
    assert m_packed["tokens_scored"] == m_single["tokens_scored"] == sum(len(tok.encode(e.answer)) for e in flat)
    assert math.isclose(float(loss_packed), float(loss_single), rel_tol=1e-5)
    assert m_packed["answer_accuracy"] == m_single["answer_accuracy"]


def test_packed_training_batches_hold_balanced_questions_about_one_graph_each():
    cfg = small_config(questions_per_graph=4, seq_len=240)
    tok = task_tokenizer()
    batch = TransitivityBatches(cfg, tok).batch(0, 8, seed=1)
    length = batch["tokens"].shape[1]  # cut after the longest row
    assert length <= cfg.seq_len + 1 and (batch["tokens"][:, -1] != tok.pad_id).any()
    assert batch["attn_mask"].shape == (8, length, length) and batch["positions"].shape == (8, length)
    answers = [tok.decode(row[mask].tolist()) for row, mask in zip(batch["tokens"], batch["answer_mask"])]
    assert sum(a.count("Yes") for a in answers) == 16  # 8 graphs x 4 questions, half of them Yes
    assert sum(a.count("No") for a in answers) == 16
    text = tok.decode([t for t in batch["tokens"][0].tolist() if t != tok.pad_id])
    assert text.count("Does") == 4 and text.count("?") == 4
    # a question never sees another question: rows of the second question hide the first
    mask = batch["attn_mask"][0]
    answer_rows = torch.nonzero(batch["answer_mask"][0]).flatten()
    assert not mask[answer_rows[-1], answer_rows[0]]  # the last answer cannot attend to the first one
    assert mask[answer_rows[-1], 0]  # but it sees the premises


def test_trimming_packed_padding_leaves_the_loss_unchanged():
    cfg = small_config(questions_per_graph=4, seq_len=240)
    tok = task_tokenizer()
    model = build_model(cfg, tok).eval()
    groups = training_groups(np.random.default_rng(5), cfg, 6, 4)
    padded = encode_packed(tok, groups, cfg.seq_len + 1)
    trimmed = trim_padding(padded, tok.pad_id)
    assert trimmed["tokens"].shape[1] < padded["tokens"].shape[1]
    with torch.no_grad():
        loss_padded, m_padded = AnswerLoss()(model, padded, torch.Generator())
        loss_trimmed, m_trimmed = AnswerLoss()(model, trimmed, torch.Generator())
    assert m_padded["tokens_scored"] == m_trimmed["tokens_scored"]
    assert math.isclose(float(loss_padded), float(loss_trimmed), rel_tol=1e-5)


def test_packed_sequences_must_fit_seq_len():
    with pytest.raises(ConfigError, match="8 questions"):
        small_config(questions_per_graph=8)


def test_curriculum_grows_training_chains_from_two_nodes_and_leaves_evaluation_alone():
    cfg = small_config(curriculum_fraction=0.5, steps=100)
    assert [largest_chain(cfg, p) for p in (0.0, 0.09, 0.1, 0.3, 0.49, 0.5, 1.0)] == [2, 2, 3, 5, 6, 6, 6]
    source = TransitivityBatches(cfg, task_tokenizer())
    tok = source.tokenizer
    first = tok.decode([t for t in source.batch(0, 16, seed=0)["tokens"][0].tolist() if t != tok.pad_id])
    assert first.count("causes") == 1  # a 2-node chain at the start
    rng = np.random.default_rng(0)
    assert {e.graph.n_nodes for e in training_examples(rng, cfg, 200, progress=0.0)} == {2}
    assert {e.graph.n_nodes for e in training_examples(rng, cfg, 200, progress=0.8)} == {3, 4, 5, 6}
    held_out = training_examples(rng, cfg, 200, evaluation=True, progress=0.0)
    assert min(e.graph.n_nodes for e in held_out) == cfg.train_min_nodes


def test_name_curriculum_starts_with_one_character_names():
    cfg = small_config(curriculum_fraction=0.6, curriculum_names=True)
    assert [longest_name(cfg, p) for p in (0.0, 0.19, 0.2, 0.39, 0.4, 0.6, 1.0)] == [1, 1, 2, 2, 3, 3, 3]
    rng = np.random.default_rng(0)
    early = training_examples(rng, cfg, 100, progress=0.1)
    assert {len(name) for e in early for name in e.graph.names} == {1}
    late = training_examples(rng, cfg, 100, progress=0.9)
    assert {len(name) for e in late for name in e.graph.names} == {1, 2, 3}
    held_out = training_examples(rng, cfg, 100, evaluation=True, progress=0.1)
    assert {len(name) for e in held_out for name in e.graph.names} == {1, 2, 3}
    assert longest_name(small_config(curriculum_fraction=0.6), 0.0) == 3  # only with curriculum_names


def test_char_tokenizer_covers_the_alphabet_without_unknowns():
    tok = task_tokenizer("char")
    assert tok.unk_id not in tok.encode(ALPHABET)
    assert tok.decode(tok.encode("a1 causes Zq. Does a1 cause Zq? Yes")) == "a1 causes Zq. Does a1 cause Zq? Yes"


def test_paper_tokenizer_keeps_keywords_whole_and_spells_names():
    tok = task_tokenizer("paper")
    ids = tok.encode("a1 causes Zq. Does a1 cause Zq? Yes")
    assert tok.token_strings(ids) == ["a", "1", "causes", "Z", "q", ".", "Does", "a", "1", "cause", "Z", "q", "?", "Yes"]
    assert tok.unk_id not in tok.encode(" ".join(ALPHABET))


@pytest.mark.parametrize("kind", ["char", "paper"])
def test_answer_agrees_with_the_training_loss(kind):
    cfg = small_config(tokenizer=kind)
    tok = task_tokenizer(kind)
    model = build_model(cfg, tok).eval()
    graph = linear_chain(np.random.default_rng(8), 4, flip_prob=0.5)
    a, b = graph.names[0], graph.names[3]
    prompt = question_prompt(graph.premises(), a, b)
    lp_yes, lp_no = (float(x[0]) for x in answer_log_probs(model, tok, [prompt]))
    for word, lp in (("Yes", lp_yes), ("No", lp_no)):
        n_answer = len(tok.encode(word))
        encoded = encode_examples(tok, [prompt + word], [n_answer], cfg.seq_len + 1)  # padded as in training
        with torch.no_grad():
            loss, metrics = AnswerLoss()(model, encoded, torch.Generator())
        assert metrics["tokens_scored"] == n_answer
        assert math.isclose(float(loss) * n_answer, -lp, rel_tol=1e-5)
    assert math.isclose(answer(model, tok, graph.premises(), a, b), 1 / (1 + math.exp(lp_no - lp_yes)), rel_tol=1e-6)


def test_config_refuses_a_model_too_short_for_the_evaluation_graphs():
    with pytest.raises(ConfigError, match="max_seq_len"):
        small_config(max_seq_len=200)
    with pytest.raises(ConfigError, match="eval_examples"):
        small_config(eval_examples=7)
    with pytest.raises(ConfigError, match="seq_len"):
        small_config(seq_len=50)
    with pytest.raises(ConfigError, match="at most max_seq_len"):
        small_config(seq_len=500)


def test_trained_model_reloads_from_its_run_folder(tmp_path):
    cfg = small_config(steps=4, checkpoint_every=4, accuracy_every=4, eval_every=4)
    run = create_run("causal_axioms_test", cfg.to_dict(), tmp_path / "run")
    model, tok, _ = train_model(cfg, run, progress=False)
    reloaded, reloaded_tok = open_run(run.path).load_model()
    prompt = [question_prompt("a causes b. b causes c.", "a", "c")]
    np.testing.assert_allclose(answer_log_probs(reloaded, reloaded_tok, prompt), answer_log_probs(model.cpu(), tok, prompt))

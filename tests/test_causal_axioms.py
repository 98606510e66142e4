"""The causal-transitivity task: labels, hop counts, hard negatives, evaluation splits, baselines, BOS,
the text interface, answer scoring and the embedding-scale convention."""

import math
import re

import networkx as nx
import numpy as np
import pytest
import torch

from lablib.config import ConfigError, ModelConfig
from lablib.evidence import split_of
from lablib.models import EMBED_STD, Transformer
from lablib.runs import create_run, open_run
from lablib.experiments.causal_axioms import (AnswerLoss, CausalAxiomsConfig, CausalAxiomsStudyConfig,
                                              TransitivityBatches, build_model, evaluation_sets, items, largest_chain,
                                              longest_name, quotas, reference_scores, run_study, score, train_model,
                                              training_examples, training_groups)
from lablib.tasks.causal_axioms import (ALPHABET, CausalGraph, Example, answer, answer_log_probs, ask, branching_dag,
                                        edge_lookup, encode_answered, encode_examples, encode_packed,
                                        is_evaluation_graph, linear_chain, mention_order, question_prompt,
                                        task_tokenizer, trim_padding)


def small_config(**overrides):
    if overrides.get("tokenizer") == "char":  # ~2.5x the paper tokenizer's tokens
        overrides = {"seq_len": 260, "max_seq_len": 420, **overrides}
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


@pytest.mark.parametrize("kind", ["char", "paper"])
@pytest.mark.parametrize("pos", ["none", "learned", "sinusoidal", "rope"])
def test_packed_questions_score_exactly_like_single_questions(kind, pos):
    cfg = small_config(tokenizer=kind, pos=pos)
    tok = task_tokenizer(kind, cfg.bos)
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
    cfg = small_config(questions_per_graph=4)
    tok = task_tokenizer(cfg.tokenizer, cfg.bos)
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
    cfg = small_config(questions_per_graph=4)
    tok = task_tokenizer(cfg.tokenizer, cfg.bos)
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


def test_curriculum_grows_training_chains_from_two_nodes_and_leaves_evaluation_alone():
    cfg = small_config(curriculum_fraction=0.5, steps=100)
    assert [largest_chain(cfg, p) for p in (0.0, 0.09, 0.1, 0.3, 0.49, 0.5, 1.0)] == [2, 2, 3, 5, 6, 6, 6]
    source = TransitivityBatches(cfg, task_tokenizer(cfg.tokenizer, cfg.bos))
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
    tok = task_tokenizer(kind, cfg.bos)
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
        small_config(max_seq_len=150)
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


# --- hop counts, hard negatives, evaluation splits -------------------------------------------------

def test_hop_counts_are_networkx_shortest_paths():
    for graph in random_graphs(600, seed=11):
        g = graph.to_networkx()
        hops = graph.hop_counts()
        for a in range(graph.n_nodes):
            lengths = nx.single_source_shortest_path_length(g, graph.names[a])
            for b in range(graph.n_nodes):
                want = lengths.get(graph.names[b], 0) if a != b else 0
                assert hops[a, b] == want, (graph.premises(), a, b)


def test_ask_gives_the_hop_count_and_negative_kind_it_claims():
    rng = np.random.default_rng(12)
    seen = set()
    for graph in random_graphs(400, seed=12):
        g = graph.to_networkx()
        for h in range(1, graph.n_nodes):
            try:
                e = ask(rng, graph, True, hops=h)
            except ValueError:
                continue
            assert nx.shortest_path_length(g, graph.names[e.a], graph.names[e.b]) == h == e.hops
            seen.add(h)
        for kind in ("reversed", "unrelated"):
            try:
                e = ask(rng, graph, False, negative=kind)
            except ValueError:
                continue
            a, b = graph.names[e.a], graph.names[e.b]
            assert not nx.has_path(g, a, b) and e.kind == kind
            assert nx.has_path(g, b, a) == (kind == "reversed")
    assert {1, 2, 3, 4, 5} <= seen


def test_hard_negatives_have_the_reversed_path_and_the_same_words():
    graph = CausalGraph(("A", "B", "C"), ((0, 1), (1, 2)))  # A -> B -> C
    e = ask(np.random.default_rng(0), graph, False, negative="reversed")
    assert (graph.names[e.a], graph.names[e.b]) in {("B", "A"), ("C", "B"), ("C", "A")}
    words = set(e.graph.premises().replace(".", "").split())
    assert {graph.names[e.a], graph.names[e.b]} <= words
    assert nx.has_path(graph.to_networkx(), graph.names[e.b], graph.names[e.a])
    with pytest.raises(ValueError, match="unrelated"):
        ask(np.random.default_rng(0), graph, False, negative="unrelated")  # a plain chain links every pair


def test_evaluation_splits_hold_their_quotas_and_half_of_yes_is_multi_hop():
    cfg = small_config(eval_examples=12)
    sets = evaluation_sets(cfg)
    assert set(sets) == {"in_distribution", "chain", "reversed", "branch_1.4", "branch_2"}
    assert list(sets["in_distribution"]) == [3, 4, 5, 6] and list(sets["chain"]) == [7, 15]
    q = quotas(cfg)
    for name, by_size in sets.items():
        for n, splits in by_size.items():
            for split, examples in splits.items():
                assert len(examples) == 12 and all(e.graph.n_nodes == n for e in examples)
                yes = [e for e in examples if e.label]
                assert len(yes) == 6
                assert sum(e.hops >= 2 for e in yes) == q["multi_hop"] >= len(yes) / 2, (name, n, split)
                kinds = [e.kind for e in examples if not e.label]
                if name == "reversed":  # an unflipped chain has no unrelated pair
                    assert kinds.count("reversed") == 6
                else:
                    assert kinds.count("reversed") == q["reversed"] and kinds.count("unrelated") == q["unrelated"]
                g = nx.DiGraph()
                for e in examples:  # every label is a path check
                    g = e.graph.to_networkx()
                    assert e.label == nx.has_path(g, e.graph.names[e.a], e.graph.names[e.b])


def test_dev_and_test_are_disjoint_by_graph_and_both_held_out_from_training():
    cfg = small_config(eval_examples=20)
    sets = evaluation_sets(cfg)
    dev, test = items(sets, "dev"), items(sets, "test")
    assert all(split_of(e.graph.key()) == "dev" for e in dev) and all(split_of(e.graph.key()) == "test" for e in test)
    assert not {e.graph.key() for e in dev} & {e.graph.key() for e in test}
    assert all(is_evaluation_graph(e.graph) for e in dev + test)
    train = training_examples(np.random.default_rng(6), cfg, 2000)
    assert not any(is_evaluation_graph(e.graph) for e in train)


def test_evaluation_sets_are_the_same_for_every_run():
    first, second = evaluation_sets(small_config()), evaluation_sets(small_config(seed=5, pos="rope"))
    assert [e.prompt for e in first["chain"][7]["test"]] == [e.prompt for e in second["chain"][7]["test"]]


def test_training_questions_are_balanced_and_mostly_multi_hop_where_possible():
    cfg = small_config(questions_per_graph=4)
    groups = training_groups(np.random.default_rng(1), cfg, 300, 4)
    flat = [e for g in groups for e in g]
    yes = [e for e in flat if e.label]
    assert len(yes) == len(flat) // 2
    assert np.mean([e.hops >= 2 for e in yes]) > 0.4  # 2/3 where the chain has a longer path
    assert {e.kind for e in flat if not e.label} == {"reversed", "unrelated"}


# --- baselines ------------------------------------------------------------------------------------

def test_trivial_rules_on_hand_made_items():
    graph = CausalGraph(("A", "B", "C", "D"), ((1, 2), (0, 1), (3, 2)))  # "B causes C. A causes B. D causes C."
    ex = lambda a, b: Example(graph, a, b, bool(graph.reachability()[a, b]))  # noqa: E731
    assert edge_lookup(ex(0, 1)) and edge_lookup(ex(1, 2)) and not edge_lookup(ex(0, 2))  # A->C needs two hops
    assert not edge_lookup(ex(1, 0))
    # mention order: B, C, A, D
    assert mention_order(ex(1, 0)) and mention_order(ex(2, 3)) and not mention_order(ex(0, 2))
    sets = {"hand": {4: {"dev": [ex(0, 1), ex(0, 2), ex(1, 0), ex(0, 3)], "test": [ex(0, 1), ex(0, 2), ex(1, 0), ex(0, 3)]}}}
    refs = reference_scores(sets, "test")
    assert refs["chance"]["hand"]["accuracy"] == 0.5
    assert refs["edge lookup"]["hand"]["accuracy"] == 0.75  # wrong only on the two-hop Yes
    assert refs["edge lookup"]["hand"]["yes_multi_hop"] == 0.0 and refs["edge lookup"]["hand"]["reversed"] == 1.0
    assert refs["majority"]["hand"]["accuracy"] == 0.5  # dev is balanced: Yes on a tie
    assert refs["mention order"]["hand"]["accuracy"] == 0.0  # B, C, A, D: wrong on all four


# --- BOS and embedding scale ------------------------------------------------------------------------

def first_tokens(model, tok, premises, a, b):
    seen = []
    handle = model.embed.register_forward_hook(lambda m, args, out: seen.append(args[0][:, 0].tolist()))
    try:
        answer(model, tok, premises, a, b)
    finally:
        handle.remove()
    return {t for batch in seen for t in batch}


@pytest.mark.parametrize("kind", ["char", "paper"])
def test_answer_adds_bos_only_when_the_model_uses_one(kind):
    premises = "a causes b. b causes c."
    plain, with_bos = task_tokenizer(kind), task_tokenizer(kind, bos=True)
    assert plain.bos_id is None and with_bos.bos_id == with_bos.vocab_size - 1
    assert with_bos.encode(premises) == plain.encode(premises)  # the text itself tokenizes the same
    m_plain = build_model(small_config(tokenizer=kind, bos=False), plain)
    m_bos = build_model(small_config(tokenizer=kind, bos=True), with_bos)
    assert first_tokens(m_bos, with_bos, premises, "a", "c") == {with_bos.bos_id}
    assert first_tokens(m_plain, plain, premises, "a", "c") == set(plain.encode("a"))
    batch = TransitivityBatches(small_config(tokenizer=kind), with_bos).batch(0, 4, seed=0)
    assert (batch["tokens"][:, 0] == with_bos.bos_id).all()  # training rows start with it too
    with pytest.raises(ValueError, match="tokenizer has"):
        answer(m_plain, with_bos, premises, "a", "c")


@pytest.mark.parametrize("d_model", [32, 64, 512])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_position_and_token_embeddings_have_row_norms_within_a_small_factor(pos, d_model):
    model = Transformer(ModelConfig(vocab_size=80, d_model=d_model, n_head=4, n_layer=1, max_seq_len=256, pos=pos))
    token = model.embed.weight.detach().norm(dim=-1)
    position = (model.pos_table if pos == "sinusoidal" else model.pos_embed.weight).detach().norm(dim=-1)
    ratio = float(position.mean() / token.mean())
    assert 0.8 < ratio < 1.25, ratio
    assert math.isclose(float(position.mean()), EMBED_STD * math.sqrt(d_model), rel_tol=0.1)


def test_study_searches_recipes_on_dev_and_scores_test_only_for_the_kept_runs():
    cfg = CausalAxiomsStudyConfig.resolve("smoke", encodings=["rope"], seeds=[0, 1], learning_rates=[1e-3, 3e-3],
                                          steps=3, eval_examples=4, eval_chain_lengths=[7], branching_factors=[1.4],
                                          branching_nodes=[6], reversed_lengths=[4])
    study = run_study(cfg, log=lambda *a: None)
    assert [(r["learning_rate"], r["seed"]) for r in study["search"]] == [(1e-3, 0), (3e-3, 0)]
    assert study["chosen"]["rope"] in cfg.recipes() and set(study["test"]["rope"]) == {0, 1}
    assert set(study["untrained"]["rope"]) == {0, 1}

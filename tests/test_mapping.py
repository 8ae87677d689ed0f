"""Layer mappings (tinybert_fast.mapping)."""

import pytest

from tinybert_fast.mapping import layer_map


def test_uniform_tinybert4_from_bert_base():
    m = layer_map("uniform", 4, 12)
    # teacher layers 3, 6, 9, 12 counted from 1; hidden states embeddings, 3, 6, 9, 12
    assert m.attention == ((2,), (5,), (8,), (11,))
    assert m.hidden == ((0,), (3,), (6,), (9,), (12,))
    assert m.teacher_attention_layers == [2, 5, 8, 11]
    assert m.teacher_hidden_states == [0, 3, 6, 9, 12]


def test_top_bottom_list():
    assert layer_map("top", 4, 12).attention == ((8,), (9,), (10,), (11,))
    assert layer_map("top", 4, 12).hidden == ((0,), (9,), (10,), (11,), (12,))
    assert layer_map("last", 4, 12) == layer_map("top", 4, 12)
    assert layer_map("bottom", 4, 12).attention == ((0,), (1,), (2,), (3,))
    assert layer_map("bottom", 4, 12).hidden == ((0,), (1,), (2,), (3,), (4,))
    assert layer_map("list", 2, 6, layers=[2, 6]).attention == ((1,), (5,))
    assert layer_map("list", 2, 6, layers=[2, 6]).hidden == ((0,), (2,), (6,))


def test_mean_groups():
    m = layer_map("mean", 2, 6)
    assert m.attention == ((0, 1, 2), (3, 4, 5))
    assert m.hidden == ((0,), (1, 2, 3), (4, 5, 6))


def test_random_is_seeded_sorted_and_distinct():
    a = layer_map("random", 4, 12, seed=3)
    assert a == layer_map("random", 4, 12, seed=3)
    layers = [g[0] for g in a.attention]
    assert layers == sorted(layers) and len(set(layers)) == 4
    assert any(layer_map("random", 4, 12, seed=s) != a for s in range(4, 10))


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="uniform", n_student=5, n_teacher=12), "multiple"),
    (dict(strategy="mean", n_student=5, n_teacher=12), "multiple"),
    (dict(strategy="uniform", n_student=13, n_teacher=12), "more layers"),
    (dict(strategy="list", n_student=4, n_teacher=12, layers=[3, 6, 9]), "one teacher layer"),
    (dict(strategy="list", n_student=2, n_teacher=12, layers=[0, 13]), "1..12"),
    (dict(strategy="diagonal", n_student=4, n_teacher=12), "one of"),
    (dict(strategy="top", n_student=4, n_teacher=12, layers=[1, 2, 3, 4]), "only used"),
])
def test_bad_mappings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer_map(kwargs.pop("strategy"), **kwargs)

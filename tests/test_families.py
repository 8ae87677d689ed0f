"""Every supported encoder family captured exactly (tinybert_fast.capture): BERT, RoBERTa,
ELECTRA, MPNet and DistilBERT, small random models, a batch with padding.

For each family: the recorded scores equal Q K^T / sqrt(d) (+ MPNet's relative position bias,
computed here independently from its bucket table) on real keys, with padded keys <= -100;
softmax of them equals the eager model's attention probabilities; the capturing model's outputs
equal the eager model's; the Q/K loss equals the scores loss (MPNet: refused, it cannot carry the
bias); unsupported families are refused by name.
"""

import math

import pytest
import torch

import tinybert_fast as tbf
from tinybert_fast import capture

transformers = pytest.importorskip("transformers")

B, L, V, HEADS, LAYERS = 3, 11, 120, 4, 3


def _config(family: str, hidden: int = 32, seed_layers: int = LAYERS):
    from transformers import (BertConfig, DistilBertConfig, ElectraConfig, MPNetConfig,
                              RobertaConfig)
    common = dict(vocab_size=V, hidden_size=hidden, num_hidden_layers=seed_layers,
                  num_attention_heads=HEADS, intermediate_size=48, max_position_embeddings=64)
    if family == "bert":
        return BertConfig(**common)
    if family == "roberta":
        return RobertaConfig(**common, pad_token_id=1)
    if family == "electra":
        return ElectraConfig(**common, embedding_size=24)
    if family == "mpnet":
        return MPNetConfig(**common, pad_token_id=1, relative_attention_num_buckets=32)
    if family == "distilbert":
        return DistilBertConfig(vocab_size=V, dim=hidden, n_layers=seed_layers, n_heads=HEADS,
                                hidden_dim=48, max_position_embeddings=64, pad_token_id=0)
    raise AssertionError(family)


FAMILIES = ["bert", "roberta", "electra", "mpnet", "distilbert"]


def _models(family: str, seed: int = 0, hidden: int = 32):
    """(eager model, capturing model) with the same weights, in eval mode."""
    from transformers import AutoModel
    torch.manual_seed(seed)
    # a config each: from_config sets the attention implementation on the config it is given
    eager = AutoModel.from_config(_config(family, hidden), attn_implementation="eager").eval()
    capturing = AutoModel.from_config(_config(family, hidden),
                                      attn_implementation=capture.register()).eval()
    capturing.load_state_dict(eager.state_dict())
    return eager, capturing


def _batch(pad_id: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def _layers(model):
    return model.transformer.layer if hasattr(model, "transformer") else model.encoder.layer


def _query_key(family: str, layer):
    if family == "distilbert":
        return layer.attention.q_lin, layer.attention.k_lin
    if family == "mpnet":
        return layer.attention.attn.q, layer.attention.attn.k
    return layer.attention.self.query, layer.attention.self.key


def _bucket(relative: torch.Tensor, num_buckets: int = 32, max_distance: int = 128):
    """T5's bidirectional relative-position bucket of (key position - query position), written
    from its definition: half the buckets per direction, exact below num_buckets/4, logarithmic
    up to max_distance."""
    half = num_buckets // 2
    offset = (relative > 0).long() * half
    n = relative.abs()
    exact = half // 2
    log_bucket = exact + (torch.log(n.float().clamp(min=1) / exact)
                          / math.log(max_distance / exact) * (half - exact)).long()
    return offset + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


def _independent_scores(family: str, model, hidden_states, layer: int, mask):
    """Q K^T / sqrt(d) (+ the position bias) + the mask's dtype-min on padded keys, [B, H, L, L],
    from the layer's own projections applied to its input hidden state."""
    q_lin, k_lin = _query_key(family, _layers(model)[layer])
    h = hidden_states[layer]
    d = h.shape[-1] // HEADS
    q = q_lin(h).view(B, L, HEADS, d).transpose(1, 2)
    k = k_lin(h).view(B, L, HEADS, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if family == "mpnet":
        pos = torch.arange(L)
        table = model.encoder.relative_attention_bias.weight             # [32, H]
        scores = scores + table[_bucket(pos[None, :] - pos[:, None])].permute(2, 0, 1)
    return scores, mask[:, None, None, :].bool().expand_as(scores)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stacked", [False, True])
def test_recorded_scores_are_the_models_own(family, stacked):
    eager, capturing = _models(family)
    batch = _batch(eager.config.pad_token_id)
    layers = list(range(LAYERS))
    with torch.no_grad():
        want = eager(**batch, output_hidden_states=True, output_attentions=True)
        with capture.record_scores(layers[::-1], stacked=stacked) as rec:
            got = capturing(**batch, output_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    assert len(want.hidden_states) == LAYERS + 1
    recorded = rec.layers[::-1]
    for i in layers:
        ref, real = _independent_scores(family, eager, want.hidden_states, i,
                                        batch["attention_mask"])
        torch.testing.assert_close(recorded[i][real], ref[real], rtol=1e-5, atol=1e-5)
        assert (recorded[i][~real] <= -100).all()
        torch.testing.assert_close(recorded[i].softmax(-1), want.attentions[i],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_qk_loss_equals_the_scores_loss_or_is_refused(family):
    _, student = _models(family, seed=1, hidden=24)
    _, teacher = _models(family, seed=2)
    batch = _batch(teacher.config.pad_token_id)
    layers = list(range(LAYERS))
    with capture.record_scores(layers, stacked=True) as s_rec:
        student(**batch)
    with torch.no_grad(), capture.record_scores(layers, stacked=True) as t_rec:
        teacher(**batch)
    by_scores = tbf.attention_mse(s_rec.stacked, t_rec.stacked, batch["attention_mask"])
    assert by_scores > 0
    if capture.family(teacher.config).position_bias:
        with pytest.raises(ValueError, match="position bias"), capture.record_qk(layers):
            teacher(**batch)
        return
    with capture.record_qk(layers) as s_qk:
        student(**batch)
    with torch.no_grad(), capture.record_qk(layers) as t_qk:
        teacher(**batch)
    q_s, k_s = (torch.stack(x) for x in zip(*s_qk.layers))
    q_t, k_t = (torch.stack(x) for x in zip(*t_qk.layers))
    by_qk = tbf.attention_mse_qk(q_s, k_s, q_t, k_t, batch["attention_mask"])
    torch.testing.assert_close(by_qk, by_scores, rtol=1e-4, atol=1e-6)
    # and the gradient reaches the student's projections the same way
    g_scores = torch.autograd.grad(by_scores, _query_key(family, _layers(student)[0])[0].weight)
    student.zero_grad()
    with capture.record_qk(layers) as s_qk:
        student(**batch)
    q_s, k_s = (torch.stack(x) for x in zip(*s_qk.layers))
    by_qk = tbf.attention_mse_qk(q_s, k_s, q_t, k_t, batch["attention_mask"])
    g_qk = torch.autograd.grad(by_qk, _query_key(family, _layers(student)[0])[0].weight)
    torch.testing.assert_close(g_qk[0], g_scores[0], rtol=1e-4, atol=1e-7)


def test_an_mpnet_students_position_bias_is_trained_through_the_recorded_scores():
    _, student = _models("mpnet", seed=3)
    batch = _batch(1)
    table = student.encoder.relative_attention_bias.weight
    grads = []
    for stacked in (False, True):
        with capture.record_scores([0, 2], stacked=stacked) as rec:
            student(**batch)
        scores = rec.stacked if stacked else torch.stack(rec.layers)
        loss = scores.clamp(min=-100).square().mean()       # a function of the scores only
        grads.append(torch.autograd.grad(loss, table)[0])
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_unsupported_families_are_refused_by_name():
    from transformers import DebertaV2Config
    with pytest.raises(ValueError, match="teacher: model type 'deberta-v2'.*disentangled"):
        capture.family(DebertaV2Config(), "teacher")
    with pytest.raises(ValueError, match="'gpt2' is not supported.*supported: bert"):
        capture.family(transformers.GPT2Config())
    assert capture.family(_config("mpnet")).position_bias
    assert not capture.family(_config("distilbert")).token_types


def _targets(attention_loss="mse", family="bert"):
    from tinybert_fast import mapping
    from tinybert_fast.distill import DistillConfig, TeacherTargets
    cfg = DistillConfig(stage="task1", output_dir="o", student="s", attention_loss=attention_loss)
    return TeacherTargets.of(cfg, mapping.layer_map("uniform", 1, LAYERS), _config(family))


def test_pairs_that_cannot_be_distilled_are_refused_by_name():
    from transformers import BertConfig

    from tinybert_fast.distill import check_pair
    teacher = _config("bert")
    check_pair(_config("bert", hidden=24), teacher, _targets())        # widths may differ
    with pytest.raises(ValueError, match="vocabularies differ: the student's has 99 entries "
                                         "and the teacher's 120"):
        check_pair(BertConfig(vocab_size=99, num_attention_heads=4, hidden_size=32), teacher,
                   _targets())
    with pytest.raises(ValueError, match=r"pad with different ids \(1 and 0\)"):
        check_pair(_config("roberta"), teacher, _targets())
    other_heads = BertConfig(vocab_size=V, num_attention_heads=2, hidden_size=32)
    with pytest.raises(ValueError, match="student has 2 heads and the teacher 4"):
        check_pair(other_heads, teacher, _targets())
    # no attention term, no head pairing: the drift check_pair had (it refused this pair)
    check_pair(other_heads, teacher, _targets(attention_loss="none"))

    class Tokenizer:
        def __len__(self):
            return V + 5
    with pytest.raises(ValueError, match=f"tokenizer has {V + 5} tokens but the models' "
                                         f"vocabulary {V}"):
        check_pair(_config("bert"), teacher, _targets(), Tokenizer())


def test_presets_share_the_teachers_tokenizer_in_either_family():
    from tinybert_fast.distill import preset_config
    mpnet = _config("mpnet")
    same = preset_config("tinybert4", mpnet)
    assert (same.model_type, same.num_hidden_layers, same.hidden_size, same.num_attention_heads,
            same.intermediate_size) == ("mpnet", 4, 312, 12, 1200)
    assert (same.vocab_size, same.pad_token_id, same.relative_attention_num_buckets) == (V, 1, 32)
    bert = preset_config("tinybert4", mpnet, "bert", num_labels=3)
    assert (bert.model_type, bert.vocab_size, bert.pad_token_id, bert.num_labels) == (
        "bert", V, 1, 3)
    distil = preset_config("tinybert6", _config("distilbert"))
    assert (distil.model_type, distil.n_layers, distil.dim, distil.n_heads,
            distil.hidden_dim) == ("distilbert", 6, 768, 12, 3072)
    electra = preset_config("tinybert4", _config("electra"))
    assert electra.embedding_size == electra.hidden_size == 312


def test_an_mpnet_student_from_teacher_layers_takes_the_position_bias_table():
    from tinybert_fast import mapping
    from tinybert_fast.distill import build_student
    from transformers import AutoModel
    torch.manual_seed(4)
    teacher = AutoModel.from_config(_config("mpnet"))
    student = build_student("tinybert4", "general", None, _config("mpnet", hidden=32), "random")
    assert student.config.model_type == "mpnet"
    small = _config("mpnet")
    small.num_hidden_layers = 1
    from tinybert_fast.distill import copy_teacher_layers
    one = AutoModel.from_config(small)
    copy_teacher_layers(one, teacher, mapping.layer_map("uniform", 1, LAYERS))
    torch.testing.assert_close(one.encoder.relative_attention_bias.weight,
                               teacher.encoder.relative_attention_bias.weight)
    torch.testing.assert_close(one.encoder.layer[0].attention.attn.q.weight,
                               teacher.encoder.layer[LAYERS - 1].attention.attn.q.weight)

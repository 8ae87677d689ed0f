"""Capturing pre-softmax attention scores from Hugging Face BERT (tinybert_fast.capture)."""

import pytest
import torch

from tinybert_fast import capture

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64)
    plain = BertForSequenceClassification(cfg).eval()            # SDPA
    capturing = BertForSequenceClassification(cfg).eval()
    capturing.load_state_dict(plain.state_dict())
    capturing.set_attn_implementation(capture.register())
    ids = torch.randint(0, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return plain, capturing, dict(input_ids=ids, attention_mask=mask)


def test_scores_are_the_pre_softmax_scores_and_outputs_unchanged(pair):
    plain, capturing, batch = pair
    with capture.record_scores([2, 0]) as rec:
        out = capturing(**batch, output_hidden_states=True)
    want = plain(**batch, output_hidden_states=True)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-6)
    s2, s0 = rec.layers                         # in the order asked for
    assert s0.shape == (3, 4, 9, 9)
    # layer 0's scores from its own Q and K: QK^T/sqrt(d) + additive mask on padded keys
    att = plain.bert.encoder.layer[0].attention.self
    h = want.hidden_states[0]
    q = att.query(h).view(3, 9, 4, 12).transpose(1, 2)
    k = att.key(h).view(3, 9, 4, 12).transpose(1, 2)
    ref = q @ k.transpose(-1, -2) / 12 ** 0.5
    real = batch["attention_mask"][:, None, None, :].bool().expand_as(ref)
    torch.testing.assert_close(s0[real], ref[real], rtol=1e-5, atol=1e-5)
    assert (s0[~real] <= -100).all()            # TinyBERT's rule turns these into 0
    # without a record block nothing is kept and outputs are the same
    torch.testing.assert_close(capturing(**batch).logits, want.logits, rtol=1e-5, atol=1e-6)


def test_record_errors(pair):
    _, capturing, batch = pair
    with capture.record_scores([7]) as rec:
        capturing(**batch)
    with pytest.raises(RuntimeError, match="no scores were recorded for layers \\[7\\]"):
        rec.layers
    with pytest.raises(ValueError, match="distinct"):
        capture.ScoreRecord([1, 1])
    with capture.record_scores([0]):
        capturing(**batch)
        with pytest.raises(RuntimeError, match="twice"):
            capturing(**batch)


def test_stacked_record_is_the_same_scores_in_one_buffer(pair):
    """stacked=True: the same scores (bitwise), written into one [n, B, H, L, L] buffer with no
    copy (the layers are slots of it, `stacked` is the buffer itself), and the same gradients
    through the model as the per-layer tensors stacked by torch.stack."""
    _, capturing, batch = pair
    capturing.train(False)

    def scores_and_grads(stacked):
        capturing.zero_grad()
        with capture.record_scores([2, 0], stacked=stacked) as rec:
            out = capturing(**batch)
        scores = rec.stacked if stacked else torch.stack(rec.layers)
        loss = (scores.clamp(min=-100) ** 2).mean() + out.logits.square().sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in capturing.named_parameters() if p.grad is not None}
        return rec, scores, grads

    rec, stacked, grads = scores_and_grads(True)
    _, want, want_grads = scores_and_grads(False)
    assert stacked.shape == (2, 3, 4, 9, 9) and stacked.requires_grad
    assert torch.equal(stacked.detach(), want.detach())
    assert grads.keys() == want_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=0, atol=0, msg=name)
    # slots of one buffer, in the order asked for: no copy anywhere
    s2, s0 = rec.layers
    assert stacked.data_ptr() == s2.data_ptr()
    assert s0.data_ptr() == s2.data_ptr() + s2.numel() * s2.element_size()
    with torch.no_grad(), capture.record_scores([1], stacked=True) as rec:
        capturing(**batch)
    assert not rec.stacked.requires_grad
    with capture.record_scores([1]) as rec:
        capturing(**batch)
    with pytest.raises(RuntimeError, match="stacked=True"):
        rec.stacked
    with pytest.raises(ValueError, match="stacked=True records scores"):
        capture.ScoreRecord([1], "qk", stacked=True)

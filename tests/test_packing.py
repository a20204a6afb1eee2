"""Packing: whole examples per row, masks, position ids, labels, and packed logits == separate logits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anygpt.data.examples import Example
from anygpt.data.packing import (IGNORE_INDEX, Packer, block_causal_mask, collate_rows, pack_examples,
                                 packing_efficiency, pad_to_longest_efficiency, to_additive_mask)


def make_examples(n, lo=3, hi=40, seed=0, vocab=300):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(lo, hi))
        ids = rng.integers(3, vocab, k)
        ids[0] = 1  # BOS
        mask = rng.random(k) < 0.7
        mask[0] = False
        out.append(Example(ids.astype(np.int64), mask, f"k{i}", int(rng.integers(1, 8))))
    return out


def test_packer_keeps_whole_examples_and_is_efficient():
    exs = make_examples(300)
    rows = list(pack_examples(exs, 64, buffer_size=32))
    packed = [ex.key for row in rows for ex in row]
    assert sorted(packed) == sorted(ex.key for ex in exs)  # every example once, never split
    assert all(sum(len(ex) for ex in row) <= 64 for row in rows)
    eff = packing_efficiency(rows, 64)
    next_fit = list(pack_examples(exs, 64, buffer_size=1))
    assert eff > packing_efficiency(next_fit, 64) and eff > 0.9
    # bounded delay: an example is never packed more than buffer_size rows after it arrived
    row_of = {ex.key: r for r, row in enumerate(rows) for ex in row}
    assert all(row_of[f"k{i}"] <= i for i in range(300))
    with pytest.raises(ValueError, match="seq_len"):
        Packer(10).next_row(lambda: exs[0] if len(exs[0]) > 10 else make_examples(1, 20, 30)[0])


def test_packer_state_round_trip():
    exs = make_examples(50)
    p = Packer(64, 8)
    it = iter(exs)
    p.next_row(lambda: next(it))
    state = json.loads(json.dumps(p.state_dict()))
    q = Packer(64, 8)
    q.load_state_dict(state)
    assert [e.key for e in q.buffer] == [e.key for e in p.buffer]
    for a, b in zip(p.buffer, q.buffer):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask) and a.task == b.task
    rest = list(it)
    it1, it2 = iter(rest), iter(rest)
    assert [e.key for e in p.next_row(lambda: next(it1))] == [e.key for e in q.next_row(lambda: next(it2))]


def test_example_state_saves_the_task_name_and_reads_legacy_ids():
    from anygpt.data import task_names

    ex = Example(np.arange(6, dtype=np.int64), np.array([0, 1, 1, 0, 1, 1], bool), "src/shard/k", 4)
    state = json.loads(json.dumps(ex.to_state()))
    assert state[3] == task_names()[4] == "text2speech"  # by name: robust to tasks a plugin appends later
    back = Example.from_state(state)
    assert back.task == 4 and back.key == ex.key and np.array_equal(back.ids, ex.ids)
    assert np.array_equal(back.mask, ex.mask)
    assert Example.from_state([state[0], state[1], state[2], 4]).task == 4  # a state saved with the id
    with pytest.raises(ValueError, match="unknown task 'text2video'"):
        Example.from_state([state[0], state[1], state[2], "text2video"])


def test_collate_masks_positions_labels():
    exs = make_examples(3, 5, 9, seed=3)
    rows = [exs[:2], [exs[2]], []]
    L = 20
    b = collate_rows(rows, L, pad_id=0)
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (3, L)
    assert b["attention_mask"].shape == (3, 1, L, L) and b["attention_mask"].dtype == torch.bool
    assert b["keys"] == [["k0", "k1"], ["k2"], []]
    n0, n1 = len(exs[0]), len(exs[1])
    seg = b["segment_ids"][0]
    assert seg[:n0].eq(1).all() and seg[n0 : n0 + n1].eq(2).all() and seg[n0 + n1 :].eq(0).all()
    # positions restart per example, 0 on padding
    assert b["position_ids"][0, :n0].tolist() == list(range(n0))
    assert b["position_ids"][0, n0 : n0 + n1].tolist() == list(range(n1))
    assert b["position_ids"][0, n0 + n1 :].eq(0).all()
    # labels: ids where targets, -100 elsewhere, on padding and on every example's first token
    for o, ex in ((0, exs[0]), (n0, exs[1])):
        lab = b["labels"][0, o : o + len(ex)]
        assert lab[0] == IGNORE_INDEX
        expect = np.where(ex.mask, ex.ids, IGNORE_INDEX)
        expect[0] = IGNORE_INDEX
        assert lab.tolist() == expect.tolist()
        assert b["tasks"][0, o : o + len(ex)].eq(ex.task).all()
    assert b["labels"][0, n0 + n1 :].eq(IGNORE_INDEX).all() and b["labels"][2].eq(IGNORE_INDEX).all()
    assert b["tasks"][0, n0 + n1 :].eq(0).all() and b["input_ids"][2].eq(0).all()
    # mask: causal inside an example, nothing across examples, padding only to padding
    m = b["attention_mask"][0, 0]
    for q in range(L):
        for k in range(L):
            same = int(seg[q]) == int(seg[k])
            assert bool(m[q, k]) == (same and k <= q), (q, k)
    assert m.any(-1).all()  # no fully masked query row (softmax would give NaN)
    assert b["attention_mask"][2, 0].equal(torch.ones(L, L, dtype=torch.bool).tril())
    assert collate_rows(rows, L, 0, attention="segments")["attention_mask"] is None
    add = to_additive_mask(b["attention_mask"], torch.float32)
    assert (add[b["attention_mask"]] == 0).all() and (add[~b["attention_mask"]] < -1e30).all()


def test_pad_to_longest_efficiency():
    assert pad_to_longest_efficiency([10, 10, 5, 5], 2) == 1.0
    assert pad_to_longest_efficiency([10, 5], 2) == 0.75


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer, tiny_layout):
    from anygpt.model import build_model

    model = build_model("tiny", tiny_layout, tiny_tokenizer, seed=0).eval()
    return model


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logits_equal_separate_logits(tiny_model, tiny_layout, impl):
    model = tiny_model
    model.set_attn_implementation(impl)
    rng = np.random.default_rng(5)
    exs = []
    for i, n in enumerate((13, 7, 21)):
        ids = rng.integers(3, tiny_layout.total, n)
        ids[0] = 1
        exs.append(Example(ids.astype(np.int64), np.ones(n, bool), f"e{i}", 1))
    L = 48
    batch = collate_rows([exs, exs[1:2]], L, pad_id=0)
    mask = batch["attention_mask"] if impl == "sdpa" else to_additive_mask(batch["attention_mask"])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=batch["position_ids"]).logits
        assert torch.isfinite(packed).all()  # padding rows/positions included
        o = 0
        for ex in exs:
            alone = model(input_ids=torch.from_numpy(ex.ids)[None]).logits[0]
            torch.testing.assert_close(packed[0, o : o + len(ex)], alone, rtol=1e-4, atol=1e-4)
            o += len(ex)
        alone = model(input_ids=torch.from_numpy(exs[1].ids)[None]).logits[0]
        torch.testing.assert_close(packed[1, : len(exs[1])], alone, rtol=1e-4, atol=1e-4)
        # the loss over a packed row equals the token-weighted loss of the examples alone
        loss = model(input_ids=batch["input_ids"][:1], attention_mask=mask[:1],
                     position_ids=batch["position_ids"][:1], labels=batch["labels"][:1]).loss
        total = sum(model(input_ids=torch.from_numpy(ex.ids)[None],
                          labels=torch.from_numpy(ex.ids)[None]).loss * (len(ex) - 1) for ex in exs)
        torch.testing.assert_close(loss, total / sum(len(ex) - 1 for ex in exs), rtol=1e-4, atol=1e-5)
    model.set_attn_implementation("sdpa")


def test_segments_mode_mask_built_on_device_matches(tiny_model):
    exs = make_examples(4, 5, 12, seed=9)
    b4 = collate_rows([exs[:2], exs[2:]], 32, 0)
    bs = collate_rows([exs[:2], exs[2:]], 32, 0, attention="segments")
    assert torch.equal(block_causal_mask(bs["segment_ids"]), b4["attention_mask"])

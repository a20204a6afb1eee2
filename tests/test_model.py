import torch

from anygpt.model import build_model, llama_config, resize_to_layout


def test_resize_keeps_original_rows_and_mean_inits_new(tiny_tokenizer, tiny_layout):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("tiny", tiny_layout.base_vocab_size, tiny_tokenizer))
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    added = resize_to_layout(model, tiny_layout)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    base = tiny_layout.base_vocab_size
    assert added == tiny_layout.total - base and emb.shape[0] == head.shape[0] == tiny_layout.total
    assert torch.equal(emb[:base], emb0) and torch.equal(head[:base], head0)
    assert torch.allclose(emb[base:], emb0.mean(0).expand_as(emb[base:]))
    assert torch.allclose(head[-1], head0.mean(0))
    assert resize_to_layout(model, tiny_layout) == 0


def test_build_tiny_and_reload(tmp_path, tiny_tokenizer, tiny_layout):
    model = build_model("tiny", tiny_layout, tiny_tokenizer, seed=0)
    ids = torch.tensor([[1, tiny_layout.id("[Human]"), tiny_layout.modality("music").offset + 5]])
    logits = model(ids).logits
    assert logits.shape == (1, 3, tiny_layout.total)
    model.save_pretrained(tmp_path)
    again = build_model(str(tmp_path), tiny_layout)
    assert torch.equal(again(ids).logits, logits)

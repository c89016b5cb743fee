"""The simple generator agrees with recomputing the whole sequence at every step."""

import torch

from wren.infer.generate import generate_ids
from wren.model import CausalLM, ModelConfig


def model() -> CausalLM:
    torch.manual_seed(0)
    m = CausalLM(
        ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40)
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def test_greedy_generation_equals_full_recomputation():
    m, prompt = model(), [3, 7, 11, 2]
    out = generate_ids(m, prompt, max_new_tokens=12)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_stop_ids_length_and_seed():
    m, prompt = model(), [1, 2, 3]
    greedy = generate_ids(m, prompt, max_new_tokens=10)
    stop = greedy[2]
    assert generate_ids(m, prompt, max_new_tokens=10, stop_ids=[stop]) == greedy[: greedy.index(stop)]
    assert len(generate_ids(m, prompt, max_new_tokens=100)) == 40 - 3  # capped by the context
    a = generate_ids(m, prompt, max_new_tokens=10, temperature=1.0, seed=5)
    assert a == generate_ids(m, prompt, max_new_tokens=10, temperature=1.0, seed=5)

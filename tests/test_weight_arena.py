"""Packing a model's weights into one huge-page block moves bytes, never values."""

import sys

import pytest
import torch

from wren.infer.engine import Engine
from wren.infer.weight_arena import HUGE_PAGE, huge_pages_supported, pack_weights
from wren.model import CausalLM, ModelConfig
from wren.model.quant import quantize_linears

pytestmark = pytest.mark.skipif(not huge_pages_supported(), reason="no MADV_HUGEPAGE on this platform")


def model(bits: int | None = None, vocab_size: int = 101) -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    network = CausalLM(config).eval()
    if bits:
        quantize_linears(network, bits=bits)
    return network


def vm_flags(address: int) -> list[str]:
    """The kernel's flags for the mapping that holds `address` (Linux /proc/self/smaps)."""
    mapping = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(part, 16) for part in first.split("-"))
                mapping = start <= address < end
            elif first == "VmFlags:" and mapping:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_packed_weights_give_the_same_logits_from_one_block(bits):
    network = model(bits)
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        before = network(ids).logits
    assert pack_weights(network)
    with torch.no_grad():
        after = network(ids).logits
    assert torch.equal(before, after)
    tensors = [*network.parameters(), *network.buffers()]
    starts = sorted(t.data_ptr() for t in tensors)
    ends = max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
    total = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())
    assert starts[0] % HUGE_PAGE == 0  # the block starts on a huge page
    assert ends - starts[0] < total + 64 * len(tensors)  # end to end, only alignment between
    if sys.platform.startswith("linux"):
        assert "hg" in vm_flags(starts[0])  # MADV_HUGEPAGE took effect on the block


def test_tied_weights_stay_tied_and_the_engine_packs_on_the_cpu(tmp_path):
    import json

    from wren.tokenizer import train_tokenizer

    corpus = tmp_path / "text.jsonl"
    corpus.write_text(json.dumps({"text": "the cat sat on the mat."}) + "\n")
    tokenizer = train_tokenizer([corpus], vocab_size=300)
    network = model(vocab_size=tokenizer.vocab_size)
    embedding = network.model.embed_tokens.weight
    Engine(network, tokenizer)
    assert network.lm_head.weight is embedding  # one parameter, moved once
    assert "hg" in vm_flags(embedding.data_ptr()) or not sys.platform.startswith("linux")


def test_a_model_off_the_cpu_is_left_alone():
    with torch.device("meta"):
        network = CausalLM(ModelConfig(vocab_size=101, dim=64, n_layers=1, n_heads=4, n_kv_heads=2))
    assert not pack_weights(network)

"""LoRA adapters against HF peft: ours load in peft, peft's load in ours, merging changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import random_model

from llamaforge.config import ModelArgs
from llamaforge.lora import (
    AdapterError,
    LoraConfig,
    LoraLinear,
    add_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=128, max_seq_len=64)
INPUT = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))


def hf_twin(model) -> torch.nn.Module:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_config()))
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=True)
    return hf.eval()


def randomize_adapter(model, seed: int = 1) -> None:
    """Trained adapters have a nonzero B; the zero init would make every comparison trivially equal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(INPUT)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("lora", [LoraConfig(r=4, alpha=8, dropout=0.0),
                                  LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             use_rslora=True, rank_pattern={"v_proj": 2})])
def test_our_adapter_loads_in_peft_with_same_logits(tmp_path: Path, lora: LoraConfig) -> None:
    base = random_model(CONFIG, std=0.05)
    hf = hf_twin(base)
    model = add_lora(random_model(CONFIG, std=0.05), lora).eval()
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours = logits(model)
    torch.testing.assert_close(logits(peft_model), ours, atol=1e-5, rtol=0)
    assert (ours - logits(base)).abs().max() > 1e-2  # the adapter really changes the output


def test_peft_adapter_loads_in_llamaforge_with_same_logits(tmp_path: Path) -> None:
    base = random_model(CONFIG, std=0.05)
    settings = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                               rank_pattern={"down_proj": 6}, alpha_pattern={"k_proj": 3}, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_twin(base), settings)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_adapter(random_model(CONFIG, std=0.05), tmp_path / "peft").eval()
    assert {name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)} == {"q_proj", "k_proj", "down_proj"}
    torch.testing.assert_close(logits(model), logits(peft_model.eval()), atol=1e-5, rtol=0)


def test_merged_model_equals_base_plus_adapter(tmp_path: Path) -> None:
    model = add_lora(random_model(CONFIG, std=0.05), LoraConfig(r=4, alpha=8, dropout=0.0)).eval()
    randomize_adapter(model)
    unmerged = logits(model)
    merge_lora(model)
    assert not list(lora_layers(model))
    assert set(model.state_dict()) == set(random_model(CONFIG).state_dict())  # plain HF names again
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


def test_only_adapter_weights_train() -> None:
    model = add_lora(random_model(CONFIG), LoraConfig(r=2, target_modules="all-linear"))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert not isinstance(model.lm_head, LoraLinear)  # all-linear leaves the output head alone, as peft does
    assert len(list(lora_layers(model))) == 7 * CONFIG.n_layers


def test_adapter_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="no layer of the model matches"):
        add_lora(random_model(CONFIG), LoraConfig(target_modules=["qkv"]))
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load_adapter(random_model(CONFIG), tmp_path)
    model = add_lora(random_model(CONFIG), LoraConfig(r=4))
    save_adapter(model, tmp_path / "a")
    bigger = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=128)
    with pytest.raises(AdapterError, match="another model size"):
        load_adapter(random_model(bigger), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(random_model(CONFIG), tmp_path / "a")

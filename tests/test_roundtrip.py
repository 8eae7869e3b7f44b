"""Stock HF checkpoint -> ours -> save_pretrained -> stock HF: same weights, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from foundry_padfree import PadFreeLlamaConfig, PadFreeLlamaForCausalLM


@pytest.mark.parametrize("tied", [False, True])
def test_stock_checkpoint_round_trip(tmp_path, tied):
    config = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(1)
    stock = LlamaForCausalLM(config).eval()
    stock.save_pretrained(tmp_path / "stock")  # safetensors, as on the hub

    ours = PadFreeLlamaForCausalLM.from_pretrained(tmp_path / "stock", attn_backend="sdpa").eval()
    assert isinstance(ours.config, PadFreeLlamaConfig)
    ids = torch.randint(0, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    expected = stock(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()], expected[mask.bool()])

    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "llama"
    assert saved["architectures"] == ["LlamaForCausalLM"]
    assert "attn_backend" not in saved
    for loader in (LlamaForCausalLM, AutoModelForCausalLM):
        back = loader.from_pretrained(tmp_path / "ours").eval()
        assert type(back) is LlamaForCausalLM
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, expected, atol=0, rtol=0)


def test_a_stock_llama_config_builds_the_model_as_for_llama(tmp_path):
    # LlamaForCausalLM(config) and from_pretrained(dir, config=LlamaConfig) work with ours too.
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)  # fmt: skip
    model = PadFreeLlamaForCausalLM(config)
    assert isinstance(model.config, PadFreeLlamaConfig) and model.model.config is model.config
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    loaded = PadFreeLlamaForCausalLM.from_pretrained(tmp_path, config=LlamaConfig.from_pretrained(tmp_path))
    assert isinstance(loaded.config, PadFreeLlamaConfig)


def test_hf_attn_implementation_selects_the_backend(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)  # fmt: skip
    for implementation, backend in [("sdpa", "auto"), ("eager", "auto"), ("flash_attention_2", "flash_attn"),
                                    ("flex_attention", "flex")]:  # fmt: skip
        model = PadFreeLlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation)
        assert model.config.attn_backend == backend
        assert model.config._attn_implementation == "eager"  # no HF attention kernel runs
    config = LlamaConfig.from_pretrained(tmp_path)
    model = PadFreeLlamaForCausalLM.from_config(config, attn_implementation="flex_attention")
    assert model.config.attn_backend == "flex"
    with pytest.raises(ValueError, match=r"attn_implementation='paged_attention'.*pass attn_backend="):
        PadFreeLlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="paged_attention")
    with pytest.raises(ValueError, match=r"'flash_attention_2' and attn_backend='triton' name different kernels"):
        PadFreeLlamaForCausalLM.from_pretrained(
            tmp_path, attn_implementation="flash_attention_2", attn_backend="triton"
        )


def test_auto_classes_know_the_padfree_config(tmp_path):
    config = PadFreeLlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        attn_backend="sdpa",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, PadFreeLlamaForCausalLM)


def test_save_pretrained_arguments_as_hf_takes_them(tmp_path, monkeypatch):
    config = PadFreeLlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        attn_backend="sdpa",
    )  # fmt: skip
    model = PadFreeLlamaForCausalLM(config)
    # is_main_process given positionally (HF's second parameter): no config from a non-main rank.
    model.save_pretrained(tmp_path / "rank1", False)
    assert not (tmp_path / "rank1" / "config.json").exists()
    model.save_pretrained(tmp_path / "rank1_old_name", save_config=False)  # HF's deprecated name for it
    assert not (tmp_path / "rank1_old_name" / "config.json").exists()
    # push_to_hub uploads what a stock loader reads: it comes after the stock config is written
    # (`PreTrainedModel.push_to_hub` saves again through our save_pretrained, into its own folder).
    pushed = []

    def push_to_hub(self, repo_id, **kwargs):
        saved = json.loads((tmp_path / "my-model" / "config.json").read_text())
        pushed.append((repo_id, kwargs, saved["model_type"]))

    monkeypatch.setattr(PadFreeLlamaForCausalLM, "push_to_hub", push_to_hub)
    model.save_pretrained(tmp_path / "my-model", push_to_hub=True, commit_message="first")
    assert pushed == [("my-model", {"token": None, "commit_message": "first"}, "llama")]


# The steps of LLM-Foundry's `scripts/inference/convert_composer_to_hf.py`: the config from the
# checkpoint's HF metadata (Composer's reader), the weights under `state.model` without the
# wrapper's `model.` prefix, then `AutoModelForCausalLM` on the folder.
_CONVERT = """
import sys
import torch
from composer.models.huggingface import get_hf_config_from_composer_state_dict
from composer.utils import safe_torch_load
from transformers import AutoModelForCausalLM

checkpoint, out = sys.argv[1:]
state = safe_torch_load(checkpoint)
get_hf_config_from_composer_state_dict(state).save_pretrained(out)
weights = state["state"]["model"]
torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(weights, prefix="model.")
torch.save(weights, f"{out}/pytorch_model.bin")
print(type(AutoModelForCausalLM.from_pretrained(out)).__name__)
assert "foundry_padfree" not in sys.modules, "the conversion imported foundry_padfree"
"""


def test_a_composer_checkpoint_converts_to_a_stock_checkpoint_without_this_package(tmp_path):
    """LLM-Foundry's conversion of a Composer checkpoint gives a stock checkpoint, in a process that
    never imports foundry_padfree."""
    import subprocess
    import sys

    from tests.composer_helpers import composer_model, fit, packed_batch, write_model_dir
    from tests.data_helpers import tokenizer

    model = composer_model(write_model_dir(tmp_path / "config", vocab_size=512), tokenizer=tokenizer())
    fit(model, callbacks=[], batches=1, save_folder=str(tmp_path / "ckpt"), save_filename="ba{batch}.pt")
    run = subprocess.run([sys.executable, "-c", _CONVERT, str(tmp_path / "ckpt" / "ba1.pt"), str(tmp_path / "hf")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "LlamaForCausalLM"

    stock, info = LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(stock) is LlamaForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = packed_batch()["input_ids"], packed_batch()["attention_mask"]  # rows right-padded
    with torch.no_grad():
        ours = model.model.eval()(ids, attention_mask=mask).logits
        expected = stock.eval()(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], expected[mask.bool()])


def test_accelerate_offload_to_disk_runs_as_the_model_in_memory(tmp_path):
    """`from_pretrained(device_map=..., offload_folder=...)` leaves offloaded weights on `meta` and
    brings them in at each call; the batch goes where the embedding computes, not to `meta`."""
    config = PadFreeLlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_backend="sdpa", pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = PadFreeLlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}  # fmt: skip
    offloaded = PadFreeLlamaForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=tmp_path / "offload", attn_backend="sdpa"
    ).eval()
    assert offloaded.model.embed_tokens.weight.device.type == "meta"
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, labels=ids, return_logits=True)
        got = offloaded(ids, attention_mask=mask, labels=ids, return_logits=True)
    torch.testing.assert_close(got.loss, expected.loss)
    torch.testing.assert_close(got.logits[mask.bool()], expected.logits[mask.bool()])

"""The base policy's converted checkpoint: SmolLM2 is dequantized from its GGUF once, kept in the model cache,
and read back from there with the same weights; a cache that cannot be written only costs time."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.tiny import tiny_causal_lm, tiny_tokenizer


def test_smollm2_is_dequantized_once_and_read_back_from_the_cache_with_the_same_weights(tmp_path, monkeypatch):
    from training import generation as policy

    monkeypatch.setenv("FLYWHEEL_MODEL_CACHE", str(tmp_path / "models"))
    converted: list[tuple] = []
    real = policy.dequantize_smollm2_gguf
    monkeypatch.setattr(policy, "dequantize_smollm2_gguf", lambda: converted.append(real()) or converted[-1])

    lm, tok = policy.load_causal_lm("smollm2")  # converts, then loads the converted directory
    again, tok_again = policy.load_causal_lm("smollm2")
    assert len(converted) == 1  # the GGUF was read once
    (entry,) = (tmp_path / "models").iterdir()
    assert entry.name.startswith("smollm2-135m-instruct-fp32-") and (entry / "model.safetensors").is_file()
    from_gguf, gguf_tok = converted[0]
    want = from_gguf.state_dict()
    for got in (lm.state_dict(), again.state_dict()):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert tok.chat_template == gguf_tok.chat_template and tok.eos_token_id == gguf_tok.eos_token_id
    assert tok("hello world")["input_ids"] == gguf_tok("hello world")["input_ids"]
    assert not hasattr(lm.config, "quantization_config")  # a trained copy can be saved


@pytest.fixture
def tiny_gguf(monkeypatch):
    """The GGUF conversion replaced by a tiny model, counting its calls."""
    from training import generation as policy

    calls = []

    def convert():
        calls.append(1)
        tok = tiny_tokenizer()
        return tiny_causal_lm(len(tok)), tok

    monkeypatch.setattr(policy, "dequantize_smollm2_gguf", convert)
    return calls


def test_a_cache_that_cannot_be_written_falls_back_to_the_gguf_with_a_warning(tmp_path, monkeypatch, tiny_gguf):
    from training import generation as policy

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FLYWHEEL_MODEL_CACHE", str(blocker / "models"))
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("training.generation").addHandler(handler)
    try:
        lm, _tok = policy.load_causal_lm("smollm2")
    finally:
        logging.getLogger("training.generation").removeHandler(handler)
    assert lm.config.vocab_size == len(tiny_tokenizer())
    assert any("not writable" in w for w in warned)
    assert len(tiny_gguf) == 1  # the cache directory could not be made: no conversion wasted on it


def test_a_directory_without_its_config_is_not_taken_for_a_conversion_and_is_replaced(tmp_path, monkeypatch, tiny_gguf):
    from training import generation as policy

    monkeypatch.setenv("FLYWHEEL_MODEL_CACHE", str(tmp_path))
    target = policy.smollm2_converted_dir()
    assert len(tiny_gguf) == 1 and (target / "config.json").is_file()
    assert policy.smollm2_converted_dir() == target and len(tiny_gguf) == 1  # found, not converted again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    (target / "config.json").unlink()  # a broken copy (a conversion appears whole, by a rename)
    assert policy.smollm2_converted_dir() == target and len(tiny_gguf) == 2
    assert (target / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

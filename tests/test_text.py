import hashlib
import json
from importlib import resources

import pytest
import torch
from conftest import checkpoint_key_shapes, load_fixture

from fifo_stream.checkpoint import TEXT_PREFIX, extract, load_weights, read_state_dict
from fifo_stream.errors import FifoStreamError
from fifo_stream.text_encoder import OpenCLIPTextTower, TextEncoder
from fifo_stream.tokenizer import ClipTokenizer

_TOWER_SHAPE_KEYS = ("vocab_size", "width", "heads", "layers", "context_length")


@pytest.fixture(scope="module")
def tokenizer_oracle() -> dict:
    return json.loads(load_fixture("tokenizer_oracle.json").read_text(encoding="utf-8"))


def test_vocab_file_matches_reference(tokenizer_oracle):
    data = (resources.files("fifo_stream") / "assets" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == tokenizer_oracle["bpe_sha256"]


def test_tokenizer_matches_open_clip(tokenizer_oracle):
    tok = ClipTokenizer(context_length=tokenizer_oracle["context_length"])
    assert tok.sot_token_id == tokenizer_oracle["sot"] and tok.eot_token_id == tokenizer_oracle["eot"]
    cases = tokenizer_oracle["cases"]
    assert len(cases) >= 40
    with pytest.warns(UserWarning):  # the fixture holds over-long prompts
        batch = tok([c["prompt"] for c in cases])
    assert batch.dtype == torch.long and batch.shape == (len(cases), tok.context_length)
    for row, case in zip(batch.tolist(), cases):
        assert row == case["tokens"], case["prompt"]
    assert tok(cases[0]["prompt"]).tolist() == [cases[0]["tokens"]]


def test_tokenizer_truncation_warns():
    tok = ClipTokenizer()
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok("cat " * 200)
    assert ids.shape == (1, 77) and ids[0, -1].item() == tok.eot_token_id and (ids != 0).all()


def test_text_tower_matches_open_clip(tmp_path):
    fx = load_fixture("text_oracle.pt")
    cfg = {k: fx["text_cfg"][k] for k in _TOWER_SHAPE_KEYS}
    tower = OpenCLIPTextTower(**cfg, embed_dim=fx["embed_dim"], layer=fx["layer"]).eval()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": fx["state_dict"]}, path)
    load_weights(tower, extract(read_state_dict(path), TEXT_PREFIX), "text encoder")
    with torch.no_grad():
        out = tower(fx["tokens"])
    assert out.shape == fx["output"].shape
    assert (out - fx["output"]).abs().max().item() <= 1e-4


def test_full_size_tower_has_checkpoint_layout():
    expected = {k.removeprefix(TEXT_PREFIX): s for k, s in checkpoint_key_shapes().items() if k.startswith(TEXT_PREFIX)}
    with torch.device("meta"):
        tower = OpenCLIPTextTower()
    got = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert got == expected


def test_text_encoder_encodes_prompts():
    enc = TextEncoder.from_config({"width": 32, "heads": 2, "layers": 2, "embed_dim": 16}).eval()
    prompts = ["a photo of a cat", ""]
    out = enc.encode(prompts)
    with torch.no_grad():
        ref = enc.tower(ClipTokenizer()(prompts))
    assert out.shape == (2, 77, 32) and torch.equal(out, ref)
    with pytest.raises(FifoStreamError):
        TextEncoder.from_config({"depth": 3})

"""The exit-heads file: the adapter function, the safetensors format, and what load refuses."""
import json

import pytest
import torch
from safetensors.torch import save_file

from skimformer.errors import UserError
from skimformer.ir.exit_heads import FORMAT, ExitHeads, adapt, identity_adapter


def heads(rank=4, dim=8) -> ExitHeads:
    g = torch.Generator().manual_seed(0)
    adapters = {k: (torch.randn(rank, dim, generator=g), torch.randn(dim, rank, generator=g)) for k in (1, 3)}
    return ExitHeads(kind="decoder", adapters=adapters, criterion="margin", thresholds={1: 0.9, 3: 1.0},
                     target_agreement=0.95, agreement_before={1: 0.1, 3: 0.4}, agreement_after={1: 0.5, 3: 0.8},
                     exit_rate={1: 0.25, 3: 0.0})


def test_untrained_adapter_is_the_identity():
    down, up = identity_adapter(16, 4, torch.Generator().manual_seed(0))
    h = torch.randn(2, 5, 16)
    assert torch.equal(adapt(h, down, up), h) and down.abs().sum() > 0


def test_adapter_is_a_low_rank_residual():
    h, down, up = torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 2)
    torch.testing.assert_close(adapt(h, down, up), h + h @ down.T @ up.T)


def test_round_trip(tmp_path):
    path = tmp_path / "heads.safetensors"
    original = heads()
    original.save(path)
    loaded = ExitHeads.load(path)
    assert loaded.at == [1, 3] and loaded.rank == 4 and loaded.metadata() == original.metadata()
    for k in original.at:
        assert all(torch.equal(a, b) for a, b in zip(original.adapters[k], loaded.adapters[k]))
    assert [p.name for p in tmp_path.iterdir()] == ["heads.safetensors"]  # no temporary file left


def test_metadata_is_the_documented_format():
    meta = heads().metadata()
    assert meta["format"] == FORMAT and meta["kind"] == "decoder" and json.loads(meta["at"]) == [1, 3]
    assert json.loads(meta["thresholds"]) == {"1": 0.9, "3": 1.0} and meta["rank"] == "4"
    assert {"criterion", "target_agreement", "agreement_before", "agreement_after", "exit_rate"} <= set(meta)


def test_inconsistent_heads_are_refused():
    h = heads()
    with pytest.raises(ValueError, match="every exit"):
        ExitHeads(**{**h.__dict__, "thresholds": {1: 0.9}})
    with pytest.raises(ValueError, match=r"\[r, D\]"):
        ExitHeads(**{**h.__dict__, "adapters": {1: (torch.zeros(4, 8), torch.zeros(4, 8)), 3: h.adapters[3]}})


def test_load_refuses_what_is_not_exit_heads(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        ExitHeads.load(tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(UserError, match="not a safetensors file"):
        ExitHeads.load(tmp_path / "text.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(UserError, match="not an exit-heads file"):
        ExitHeads.load(tmp_path / "weights.safetensors")
    save_file({"exit.1.down": torch.zeros(4, 8)}, str(tmp_path / "cut.safetensors"), metadata=heads().metadata())
    with pytest.raises(UserError, match="damaged exit-heads file"):
        ExitHeads.load(tmp_path / "cut.safetensors")

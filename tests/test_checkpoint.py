"""Atomic state files: round trip, corruption reported as such, pickle payloads refused."""

import pickle

import numpy as np
import pytest
import torch

from selfscale.checkpoint import (TMP_PREFIX, atomic_write_bytes, load_state,
                                  remove_orphan_temps, save_state)
from selfscale.errors import CheckpointError


def _state():
    rng = np.random.default_rng(5)
    rng.random(3)
    return {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "rng": rng.bit_generator.state,
            "torch_gen": torch.Generator().manual_seed(3).get_state(),
            "history": [{"step": 5, "f1": 0.5}], "name": "x", "flags": [True, False]}


def test_round_trip_restores_values_and_generators(tmp_path):
    """Tensors, ints, nested lists/dicts and numpy/torch generator states survive a round trip."""
    state = _state()
    save_state(tmp_path / "s.pt", state)
    back = load_state(tmp_path / "s.pt")
    assert torch.equal(back["w"], state["w"]) and back["step"] == 7
    assert back["history"] == [{"step": 5, "f1": 0.5}] and back["flags"] == [True, False]
    rng = np.random.default_rng()
    rng.bit_generator.state = back["rng"]
    ref = np.random.default_rng(5)
    ref.random(3)
    assert rng.random() == ref.random()
    g = torch.Generator()
    g.set_state(back["torch_gen"])
    assert torch.equal(torch.rand(3, generator=g),
                       torch.rand(3, generator=torch.Generator().manual_seed(3)))


def test_flipped_byte_is_reported_as_corrupt(tmp_path):
    """One changed byte → 'checkpoint is corrupt', not a crash or silent garbage."""
    path = tmp_path / "s.pt"
    save_state(path, _state())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checkpoint is corrupt"):
        load_state(path)


def test_truncated_file_with_matching_checksum_is_corrupt(tmp_path):
    """A truncated file whose checksum was rewritten to match still fails cleanly."""
    import hashlib

    path = tmp_path / "s.pt"
    save_state(path, _state())
    data = path.read_bytes()[:200]
    path.write_bytes(data)
    (tmp_path / "s.pt.sha256").write_text(hashlib.sha256(data).hexdigest() + "  s.pt\n")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(path)


def test_missing_checksum_and_missing_file(tmp_path):
    """No checksum file → corrupt; no file → not found."""
    path = tmp_path / "s.pt"
    save_state(path, _state())
    (tmp_path / "s.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="checksum file"):
        load_state(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "nope.pt")


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    """A crafted pickle with a valid checksum raises instead of executing code."""
    import hashlib
    import io

    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    torch.save({"evil": _Payload()}, buf)
    path = tmp_path / "s.pt"
    path.write_bytes(buf.getvalue())
    (tmp_path / "s.pt.sha256").write_text(hashlib.sha256(buf.getvalue()).hexdigest() + "\n")
    with pytest.raises(CheckpointError, match="unsafe or corrupt"):
        load_state(path)
    assert not (tmp_path / "PWNED").exists()
    # the raw payload would indeed run code if unpickled naively
    assert pickle.dumps(_Payload())


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    """A failure during the write leaves the previous file intact and no temp file behind."""
    import os

    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def test_orphan_temp_files_are_removed(tmp_path):
    """Temp files of a killed writer are cleaned up at start."""
    (tmp_path / (TMP_PREFIX + "state.pt.abc")).write_bytes(b"partial")
    (tmp_path / "state.pt").write_bytes(b"keep")
    assert remove_orphan_temps(tmp_path) == 1
    assert (tmp_path / "state.pt").read_bytes() == b"keep"


def test_a_kill_between_the_two_writes_leaves_a_loadable_file(tmp_path, monkeypatch):
    """Interrupt save_state after the checksum step and before the data is replaced, or
    after the data and before the final checksum: the state loads (old or new) either way."""
    import selfscale.checkpoint as ck

    path = tmp_path / "s.pt"
    save_state(path, {"v": torch.tensor(1.0)})
    real = ck.atomic_write_bytes
    monkeypatch.setattr(ck, "atomic_write_bytes", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_state(path, {"v": torch.tensor(2.0)})
    assert float(load_state(path)["v"]) == 1.0
    monkeypatch.setattr(ck, "atomic_write_bytes", real)
    calls = {"n": 0}
    real_text = ck.atomic_write_text

    def die_on_second_checksum(p, text):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_text(p, text)

    monkeypatch.setattr(ck, "atomic_write_text", die_on_second_checksum)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, {"v": torch.tensor(3.0)})
    assert float(load_state(path)["v"]) == 3.0

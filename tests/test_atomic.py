"""spp_jax.atomic: the target is the old file or the whole new one, never a partial one."""
import os

import numpy as np
import pytest

from spp_jax import atomic


def test_write_text_creates_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "eval.md"
    assert atomic.write_text(target, "first\n") == str(target)
    assert target.read_text() == "first\n"
    atomic.write_text(target, "second\n")
    assert target.read_text() == "second\n"
    assert os.listdir(target.parent) == ["eval.md"]  # no temporary file left behind


def test_old_content_until_the_block_ends_and_kept_on_error(tmp_path):
    target = tmp_path / "t.json"
    target.write_text("old")
    with atomic.path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("new, half")
        assert target.read_text() == "old"  # a reader meanwhile sees the old file
    assert target.read_text() == "new, half"
    with pytest.raises(RuntimeError):
        with atomic.path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("never")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "new, half" and os.listdir(tmp_path) == ["t.json"]


@pytest.mark.parametrize("name", ["m.npy", "c.npz"])
def test_numpy_writers_keep_the_name(tmp_path, name):
    # numpy appends .npy / .npz to a name without it: the temporary name keeps the extension,
    # so the renamed file is the target and nothing else is left.
    target = tmp_path / name
    x = np.arange(6.0).reshape(2, 3)
    with atomic.path(target) as tmp:
        np.save(tmp, x) if name.endswith(".npy") else np.savez(tmp, x=x)
    got = np.load(target)
    np.testing.assert_array_equal(got if name.endswith(".npy") else got["x"], x)
    assert os.listdir(tmp_path) == [name]

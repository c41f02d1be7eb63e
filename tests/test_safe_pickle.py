"""The restricted unpickler: dataset pickles load, anything that would run code is refused."""

import os
import pickle
import subprocess

import numpy as np
import pytest

from amldist.errors import UserError
from amldist.safe_pickle import safe_load, safe_loads


class _RunsShell:
    """Unpickling this calls os.system (the classic malicious pickle)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class _OpensProcess:
    def __reduce__(self):
        return (subprocess.Popen, (["true"],))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("dtype", [np.int64, np.float32])
@pytest.mark.parametrize("shape", [(3, 4), (0,)])
def test_numpy_arrays_round_trip(protocol, dtype, shape):
    array = (np.arange(int(np.prod(shape))).reshape(shape) * 1.5).astype(dtype)
    loaded = safe_loads(pickle.dumps(array, protocol=protocol))
    assert loaded.shape == shape
    assert loaded.dtype == dtype
    np.testing.assert_array_equal(loaded, array)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_containers_and_scalars(protocol):
    value = {"cids": ["a" * 32, "b" * 32], "cluster": [0, 1], "nested": {"x": (1.5, None, True)},
             "set": {3, 4}, "scalar": np.int64(7), "bytes": b"\x00\xff", "arr": np.array([1, 2], np.int64)}
    loaded = safe_loads(pickle.dumps(value, protocol=protocol))
    assert loaded["cids"] == value["cids"] and loaded["nested"] == value["nested"]
    assert loaded["set"] == {3, 4} and loaded["scalar"] == 7 and loaded["bytes"] == b"\x00\xff"
    np.testing.assert_array_equal(loaded["arr"], [1, 2])


def test_python2_builtin_module_name_is_accepted():
    # Protocol-2 pickle of set([1]) as Python 2 writes it: c__builtin__\nset
    data = b"\x80\x02c__builtin__\nset\nq\x00]q\x01K\x01a\x85q\x02Rq\x03."
    assert safe_loads(data) == {1}


def test_os_system_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(_RunsShell(f"touch {marker}"), protocol=2)
    with pytest.raises(UserError, match="system"):
        safe_loads(data)
    assert not marker.exists()


@pytest.mark.parametrize("payload, name", [(_CallsEval(), "eval"), (_OpensProcess(), "Popen")])
def test_eval_and_popen_are_refused(payload, name):
    with pytest.raises(UserError, match=name):
        safe_loads(pickle.dumps(payload, protocol=4))


def test_bytes_with_an_argument_is_refused():
    # bytes(10**12) would only allocate memory; pickle itself never writes it.
    data = b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R."
    with pytest.raises(UserError, match="bytes"):
        safe_loads(data)


def test_codecs_encode_only_for_latin1():
    # _codecs.encode('abc', 'rot13') is not how pickle writes bytes: refused.
    data = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(UserError, match="refusing"):
        safe_loads(data)


def test_truncated_pickle_is_a_user_error(tmp_path):
    path = tmp_path / "db.pkl"
    path.write_bytes(pickle.dumps({"cids": list(range(100))}, protocol=4)[:-10])
    with pytest.raises(UserError, match="db.pkl"):
        safe_load(path)


def test_missing_file_and_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        safe_load(tmp_path / "absent.pkl")
    with pytest.raises(UserError, match="folder"):
        safe_load(tmp_path)

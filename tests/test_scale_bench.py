"""benchmarks/scale_bench.py at a tiny size: it builds run folders with the project's writers,
measures each stage in its own process, writes a row per case and stage, the bucketed
merge's results.csv is the in-memory merge's, the index stages index a tree of files and the
same tree in a SeaweedFS bucket, and the relabel stage moves every object on SeaweedFS and
back with the same checksums."""

from __future__ import annotations

import re

from benchmarks import scale_bench


def test_the_scale_benchmark_at_a_tiny_size(tmp_path):
    out = tmp_path / "SCALE_RESULTS.md"
    code = scale_bench.main(["--sizes", "1500x10,600x300", "--out", str(out),
                             "--work", str(tmp_path / "work")])
    assert code == 0
    text = out.read_text()
    rows = {(m[1], m[2]): m for m in re.finditer(
        r"^\| ([\d.,kM]+ x [\d,]+) \| (\w+) \| ([^|]*) \| (\d*) \| ([\d.]+) \| ([\d.]+) \| "
        r"([\d.]+) \| ([^|]*) \|$", text, flags=re.M)}
    cases = ["1.5k x 10", "600 x 300"]
    merge_stages = {"merge", "merge_bucketed", "report"}
    # The index and relabel stages run at 10 classes only (a tree of files, a bucket of
    # objects; a move costs the same whatever the audit's classes).
    assert set(rows) == ({(c, s) for c in cases for s in merge_stages}
                         | {("1.5k x 10", s) for s in ("index", "index_s3", "relabel")})
    assert {s.name for s in scale_bench.STAGES} == merge_stages | {"index", "index_s3",
                                                                   "relabel"}
    for stage in ("index", "index_s3"):
        assert re.fullmatch(r"[\d,]+ files/s, \d+ workers; listing [\d.]+ s; files written "
                            r"in \d+ s", rows[("1.5k x 10", stage)][8].strip())
    for case in cases:
        merge, bucketed = rows[(case, "merge")], rows[(case, "merge_bucketed")]
        assert merge[4] == "1" and int(bucketed[4]) >= 3  # in memory vs several buckets
        assert bucketed[8].strip() == "results.csv identical to merge's"
        assert float(merge[7]) > 0.05 and float(merge[6]) > 0  # peak RSS (GB) and CPU time
    assert rows[("1.5k x 10", "relabel")][8].startswith("1,500 moves on SeaweedFS: relabel ")
    assert "checksums equal after relabel and undo" in rows[("1.5k x 10", "relabel")][8]
    assert re.search(r"bare copy \+ delete \d+ moves/s \(server CPU \d+ s\), relabel at \d+% "
                     r"of it", rows[("1.5k x 10", "relabel")][8])
    assert "Growth between sizes" not in text  # one size per class count
    assert "RESULTS DIFFER" not in text

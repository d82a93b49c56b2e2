"""The leaderboard's run times, from the workflow's benchmark files."""

from cryopose.leaderboard import timings_from_benchmarks


def _tsv(path, seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:{int(seconds):02d}\t1\n")
    return path


def test_a_refined_row_costs_its_base_and_its_refinement(tmp_path):
    b = tmp_path / "results" / "benchmarks"
    files = {
        "train": [_tsv(b / "train" / "m" / "e" / f"half{h}.tsv", 10 + h) for h in (0, 1)],
        "predict": [_tsv(b / "predict" / "m" / "e" / f"half{h}.tsv", 2) for h in (0, 1)],
        "refine": [_tsv(b / "refine" / "m+refine" / "e" / f"half{h}.tsv", 5) for h in (0, 1)],
    }
    t = timings_from_benchmarks(files)
    assert t[("m", "e")] == {"train_seconds": 21.0, "predict_seconds": 4.0}
    # Running m+refine from scratch: m's training, m's prediction, then the refinement.
    assert t[("m+refine", "e")] == {"refine_seconds": 10.0, "train_seconds": 21.0, "predict_seconds": 14.0}

"""Any program as a method (issue 20, item 2): the `command` method runs shell command templates
whose placeholders are shell-quoted, shows the program one half at a time (the test half blind),
and takes its output through the same import and checks as any predictions."""

import sys
from pathlib import Path

import pytest
import starfile

from cryopose import cli, io
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.evaluate import evaluate
from cryopose.methods import check_params, get_method
from cryopose.simulate import SimulationSpec, simulate_entry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "command-method" / "nearest_view.py"


@pytest.fixture(scope="module")
def entry(tmp_path_factory) -> Entry:
    spec = SimulationSpec(name="cmd_c1", symmetry="C1", box_size=32, pixel_size=4.0, n_particles=60, seed=3, snr=1.0)
    return Entry(simulate_entry(spec, tmp_path_factory.mktemp("bench"), progress=False))


def nearest_view(stage: str) -> str:
    """The example program's template: a Python script cryopose cannot import, run as a program."""
    outputs = " {output}" if stage == "predict" else ""
    return f"{sys.executable} {EXAMPLE} {stage} {{particles}} {{model_dir}}{outputs}"


def test_a_program_trains_predicts_and_is_scored_with_quoted_paths(entry, tmp_path):
    method = get_method("command")
    values = {"train": nearest_view("train"), "predict": nearest_view("predict"), "prediction_type": "SO3"}
    odd = tmp_path / "a folder with 'quotes' and $HOME"  # one shell word each, nothing expanded
    preds = []
    for h in (0, 1):
        record = method.run_train(entry, h, odd / f"model{h}", values)
        assert record["method"] == "command" and record["params"]["train"] == values["train"]
        assert (odd / f"model{h}" / "views.npz").is_file()
    for h in (0, 1):
        preds.append(method.run_predict(odd / f"model{1 - h}", entry, h, tmp_path / f"half{h}.star", values))
    m = evaluate(entry, *preds, prediction_type="SO3", backend="torch", plots=False, progress=False).metrics
    assert 0 <= m["MAnE"] < 120  # a real estimator at SNR 1: better than random (~126°)
    written = starfile.read(preds[0])["particles"]
    assert list(written["rlnImageName"]) == list(entry.read_star(0).particles["rlnImageName"])  # the entry's order
    # The model of half 0 cannot predict half 0: the registry's cross-prediction check.
    with pytest.raises(InputError, match="cannot predict half 0"):
        method.run_predict(odd / "model0", entry, 0, tmp_path / "x.star", values)


def test_the_test_half_is_blind_and_the_placeholders_are_filled(entry, tmp_path):
    """The program sees its half's particles without poses at prediction, with them at training,
    and every placeholder as one word (checked by a bash program: no Python at all)."""
    seen = tmp_path / "seen"
    seen.mkdir()
    train = (
        "grep -q rlnAngleRot {particles} && test -f {entry}/info_{half}.json && "
        "printf '%s\\n' {half} {threads} {device} {symmetry} {box_size} {pixel_size} "
        f"> {seen}/train.txt && "
        f"grep -c '@' {{particles}} > {seen}/count.txt"
    )
    predict = (
        "test -n {output} && ! grep -q -e rlnAngle -e rlnOrigin -e rlnMaxValueProb {particles} && "
        f"cp {{particles}} {seen}/blind.star && exit 3"
    )
    values = {"train": train, "predict": predict, "threads": 3}
    method = get_method("command")
    method.run_train(entry, 1, tmp_path / "model1", values)
    assert (seen / "train.txt").read_text().split() == ["1", "3", "cpu", "C1", "32", "4.0"]
    assert int((seen / "count.txt").read_text()) == entry.n_particles(1)  # its own half only
    with pytest.raises(InputError, match="predict command exited with status 3"):
        method.run_predict(tmp_path / "model1", entry, 0, tmp_path / "half0.star", values)
    blind = starfile.read(seen / "blind.star")["particles"]
    assert len(blind) == entry.n_particles(0) and not (tmp_path / "half0.star").exists()
    assert not [c for c in blind.columns if c.startswith(("rlnAngle", "rlnOrigin"))]


def test_a_program_that_writes_nothing_or_too_little_is_refused(entry, tmp_path):
    method = get_method("command")
    values = {"train": "true", "predict": ": {output}"}
    method.run_train(entry, 1, tmp_path / "model1", values)
    with pytest.raises(InputError, match=r"did not write \{output\}"):
        method.run_predict(tmp_path / "model1", entry, 0, tmp_path / "a.star", values)
    # A file holding all but the first particle (the truth, so nothing else is wrong with it).
    short = tmp_path / "short.star"
    star = io.with_absolute_image_names(entry.read_star(0))
    io.write_particles_star(short, io.ParticleStar(star.optics, star.particles.iloc[1:]))
    values = {"train": "true", "predict": f"cp {short} {{output}}"}
    with pytest.raises(InputError, match="1 of the 60 particles of half 0"):
        method.run_predict(tmp_path / "model1", entry, 0, tmp_path / "b.star", values)
    assert not (tmp_path / "a.star").exists() and not (tmp_path / "b.star").exists()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"predict": "tool {output}"}, "needs its train command template"),
        ({"train": "tool", "predict": "tool --model {model_dir}"}, "must write {output}"),
        ({"train": "tool {modeldir}", "predict": "tool {output}"}, "unknown placeholder(s) {modeldir}"),
        ({"train": "tool {output}", "predict": "tool {output}"}, "unknown placeholder(s) {output}"),
        ({"train": "tool {half:3}", "predict": "tool {output}"}, "not a plain name"),
        ({"train": "t", "predict": "t {output}", "prediction_type": "SE3"}, "must be one of"),
    ],
)
def test_bad_templates_are_refused_before_anything_runs(values, message):
    with pytest.raises(InputError) as err:
        check_params("command", values, where="config: methods: mine")
    assert message in str(err.value) and "config: methods: mine" in str(err.value)


def test_the_command_line_runs_a_command_method(entry, tmp_path, capsys):
    params = ["--param", "train=true", "--param", "predict=cp {particles} {output}"]
    argv = ["train", "--method", "command", "--entry", str(entry.root), "--half", "1", "--out", str(tmp_path / "m")]
    assert cli.main(argv + params) == 0
    argv = ["predict", "--method", "command", "--model", str(tmp_path / "m"), "--entry", str(entry.root)]
    argv += ["--half", "0", "--out", str(tmp_path / "p.star")]
    # The blind half copied back has no angles: refused, naming the column.
    assert cli.main(argv + params) == 2
    assert "rlnAngleRot" in capsys.readouterr().err and not (tmp_path / "p.star").exists()

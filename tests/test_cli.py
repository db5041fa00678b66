import json

from paratime.cli import main


def test_cli_sample_gmm_writes_json_and_png(tmp_path, capsys):
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    rc = main(["sample", "--model", "gmm", "--steps", "20", "--batch", "32", "--json", str(js), "--out", str(png),
               "--no-progress"])
    assert rc == 0
    rec = json.loads(js.read_text())
    for key in ("method", "solver", "steps", "rounds", "nfe", "wall_s", "sequential_wall_s", "speedup", "max_abs_diff"):
        assert key in rec
    assert rec["method"] == "picard" and rec["steps"] == 20 and rec["rounds"] <= 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed-up" in capsys.readouterr().out


def test_cli_main_job_on_digits(tmp_path, capsys):
    png = tmp_path / "d.png"
    assert main(["--steps", "10", "--batch", "4", "--out", str(png), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model=digits" in out and "sequential" in out and "picard" in out
    assert png.stat().st_size > 100


def test_cli_bad_argument_is_a_clear_error(capsys):
    assert main(["sample", "--model", "gmm", "--solver", "rk4", "--no-progress"]) == 2
    assert "solver" in capsys.readouterr().err

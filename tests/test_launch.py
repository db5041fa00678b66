"""The launch scripts as users run them: ``torchrun ... launch/sample.py`` with 2 gloo ranks on loopback gives the
samples one process gives (the backends' promise), and rank 0 alone writes the outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from paratime import ParallelSampler

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_launch_script_samples_what_one_process_samples(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "launch" / "sample.py"), "--model", "gmm", "--steps", "10", "--batch", "4", "--window", "4",
           "--seed", "3", "--no-policy-demo", "--no-compare", "--no-progress", "--json", "stats.json",
           "--save", "samples.pt", "--out", "grid.png"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["backend"], stats["workers"], stats["method"], stats["window"]) == ("torch", 2, "picard", 4)
    # Rank 0 alone writes: one file each, and no rank-suffixed copies.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "samples.pt", "stats.json"]
    got = torch.load(tmp_path / "samples.pt")
    want = ParallelSampler("gmm", steps=10, window=4, progress=False).sample(4, seed=3)
    assert torch.equal(got, want.samples)
    assert stats["rounds"] == want.stats.rounds and stats["nfe_total"] == want.stats.nfe_total

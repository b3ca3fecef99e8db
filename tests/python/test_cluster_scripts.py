"""The cluster job files say what docs/cli.md says: the Slurm array script and the Kubernetes
Indexed Job run the same `rank --shard I/N` with N equal to the job's size, each shard into its
own CSV. (The Slurm script itself runs on a real Slurm in tests/slurm/run.sh.)"""

import re
import subprocess

import pytest

yaml = pytest.importorskip("yaml")


def test_k8s_indexed_job_shards_match_its_completions(root):
    job = yaml.safe_load((root / "scripts/k8s/sweep-job.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    n = spec["completions"]
    args = " ".join(spec["template"]["spec"]["containers"][0]["args"])
    assert f'--shard "$JOB_COMPLETION_INDEX/{n}"' in args, args
    assert f'/results/shard-$JOB_COMPLETION_INDEX-of-{n}.csv' in args, args
    assert re.search(r"\bgradalign rank\b", args)


def test_sbatch_script_is_valid_bash_and_refuses_to_run_outside_an_array(root, tmp_path):
    script = root / "scripts/slurm/sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": "/usr/bin:/bin"}
    res = subprocess.run(["bash", str(script), "models", str(tmp_path)], env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "job array" in res.stderr
    res = subprocess.run(["bash", str(script), "models", str(tmp_path)],
                         env={**env, "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                              "SLURM_ARRAY_TASK_COUNT": "3", "GRADALIGN": "echo"},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["rank", "models", "--shard", "1/3", "--out",
                                  f"{tmp_path}/shard-1-of-3.csv", "--jobs", "1"]

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
    assert spec["parallelism"] <= n and spec["podReplacementPolicy"] == "Failed"
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SHARDS"] == str(n), "SHARDS must equal completions"
    args = " ".join(container["args"])
    assert '--shard "$JOB_COMPLETION_INDEX/$SHARDS"' in args, args
    assert '/results/shard-$JOB_COMPLETION_INDEX-of-$SHARDS.csv' in args, args
    assert re.search(r"\bgradalign rank\b", args)


def test_sbatch_script_is_valid_bash_and_refuses_to_run_outside_an_array(root, tmp_path):
    script = root / "scripts/slurm/sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": "/usr/bin:/bin"}
    res = subprocess.run(["bash", str(script), "models", str(tmp_path)], env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "job array" in res.stderr
    res = subprocess.run(["bash", str(script), "models", str(tmp_path)],
                         env={**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3",
                              "GRADALIGN": "echo"},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["rank", "models", "--shard", "1/3", "--out",
                                  f"{tmp_path}/shard-1-of-3.csv", "--jobs", "1"]
    # Resubmitting task 7 of a 16-shard sweep alone: GRADALIGN_SHARDS keeps N.
    res = subprocess.run(["bash", str(script), "models", str(tmp_path)],
                         env={**env, "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "1",
                              "GRADALIGN_SHARDS": "16", "GRADALIGN": "echo"},
                         capture_output=True, text=True)
    assert res.returncode == 0 and "7/16" in res.stdout.split(), (res.stdout, res.stderr)
    # Without it, index 7 of a 1-task array is refused rather than scoring the wrong shard.
    res = subprocess.run(["bash", str(script), "models", str(tmp_path)],
                         env={**env, "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "1",
                              "GRADALIGN": "echo"},
                         capture_output=True, text=True)
    assert res.returncode == 64 and "GRADALIGN_SHARDS" in res.stderr

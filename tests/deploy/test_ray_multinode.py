"""A Ray cluster of three nodes on this machine (`ray start --head`, then `ray start --address`
with their own CPUs and a custom resource each): `ray job submit -- mario train …` places actors
on the second node, a node added mid-run gets an actor, and `ray job stop` ends the job with a
final checkpoint (the head started as deploy/ray-cluster.yaml starts it)."""

from __future__ import annotations

import json
import os
import subprocess
import time

from learner.checkpoint import load_checkpoint
from tests.deploy.processes import BIN, Process, free_port, local_program, wait_for

RAY = local_program("ray")

TINY_TRAIN = [
    "mario", "train",
    "--minutes", "10",  # a bound: the test stops the job once the third node has an actor
    "--replay.capacity", "4000",
    "--replay.min-size-to-sample", "300",
    "--replay.samples-per-insert", "2",
    "--replay.rate-error-buffer", "64",
    "--learner.batch-size", "16",
    "--actor.envs-per-actor", "2",
    "--actor.chunk-length", "50",
    "--env.max-episode-steps", "200",
    "--distributed.max-actors", "2",
    "--wandb", "disabled",
    "--no-live-display",
    "--log-every-s", "2",
]  # fmt: skip


class Cluster:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.env = {
            "HOME": str(tmp_path / "home"),  # its own ~/.ray/auth_token
            "RAY_AUTH_MODE": "token",
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1",
        }
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, Process] = {}
        self.ray("get-auth-token", "--generate")

    def try_ray(self, *args: str) -> bool:
        try:
            self.ray(*args)
        except AssertionError:
            return False
        return True

    def ray(self, *args: str) -> str:
        result = subprocess.run([RAY, *args], env={**os.environ, **self.env},
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, f"ray {args}: {result.stdout}\n{result.stderr}"
        return result.stdout

    def start_node(self, name: str, head: bool = False) -> None:
        # Nodes on one machine need their own agent ports (the defaults are fixed numbers).
        ports = [f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port")]  # fmt: skip
        common = ["--num-cpus=1", f"--resources={json.dumps({name: 1})}", *ports,
                  "--disable-usage-stats", "--block"]  # fmt: skip
        if head:
            argv = [RAY, "start", "--head", f"--port={self.gcs_port}",
                    f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={free_port()}",
                    *common]  # fmt: skip
        else:
            argv = [RAY, "start", f"--address=127.0.0.1:{self.gcs_port}", *common]
        # As deploy/ray-cluster.yaml: `ray job stop` waits for the final checkpoint; here up to
        # the test's own wait for the job's end (on 2 cores shared with the suite's other
        # worker, a stop once took over 120 s and Ray's SIGKILL came before the checkpoint).
        env = {**self.env, "RAY_JOB_STOP_WAIT_TIME_S": "280"} if head else self.env
        process = Process(argv, self.tmp / f"{name}.log", self.tmp, env)
        self.nodes[name] = process
        wait_for(lambda: name in self.node_ids(), 120, f"node {name}", process=process)

    def list(self, kind: str, *filters: str) -> list[dict]:
        """`ray list KIND` through the head's API ([] while it is not up, or when empty)."""
        args = [arg for f in filters for arg in ("--filter", f)]
        try:
            out = self.ray("list", kind, "--format=json", "--detail", *args,
                           f"--address={self.dashboard}")  # fmt: skip
        except AssertionError:
            return []
        return json.loads(out) if out.lstrip().startswith("[") else []

    def node_ids(self) -> dict[str, str]:
        """Custom resource name → node id, for the alive nodes."""
        nodes = self.list("nodes")
        out = {}
        for node in nodes:
            if node["state"] == "ALIVE":
                for resource in node.get("resources_total", {}):
                    if resource.startswith("node-"):
                        out[resource] = node["node_id"]
        return out

    def actor_nodes(self) -> set[str]:
        actors = self.list("actors", "class_name=ActorWorker", "state=ALIVE")
        return {actor["node_id"] for actor in actors}

    def job_status(self, job_id: str) -> str:
        jobs = self.list("jobs", f"submission_id={job_id}")
        out = jobs[0]["status"] if jobs else "UNKNOWN"
        for status in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
            if status in out:
                return status
        return out

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            process = self.nodes[name]
            if process.alive():
                process.stop()
            if process.alive():
                process.kill_group()


def test_ray_job_places_actors_on_other_nodes_and_on_a_node_that_joins(tmp_path):
    cluster = Cluster(tmp_path)
    run_dir = tmp_path / "run"
    try:
        cluster.start_node("node-head", head=True)  # its one CPU: the learner's
        cluster.start_node("node-2")
        job = "mario-multinode"
        submit = ["job", "submit", f"--address={cluster.dashboard}", "--no-wait",
                  f"--submission-id={job}"]  # fmt: skip
        # The head's job agent takes a moment after the node is up ("No available agent").
        wait_for(lambda: cluster.try_ray(*submit, "--", *TINY_TRAIN, "--run-dir", str(run_dir)),
                 90, "the job API")  # fmt: skip
        nodes = cluster.node_ids()
        wait_for(lambda: nodes["node-2"] in cluster.actor_nodes(), 180, "an actor on node-2")
        assert nodes["node-head"] not in cluster.actor_nodes()  # the head's CPU is the learner's
        cluster.start_node("node-3")  # joins mid-run
        node_3 = cluster.node_ids()["node-3"]
        wait_for(lambda: node_3 in cluster.actor_nodes(), 120, "an actor on node-3")
        wait_for(lambda: _updates(run_dir) > 0, 120, "the learner's first updates")
        assert cluster.job_status(job) == "RUNNING"
        cluster.ray("job", "stop", "--no-wait", f"--address={cluster.dashboard}", job)  # SIGTERM
        # Seconds alone; on 2 busy cores (the suite's other worker) it once took over 120 s.
        wait_for(lambda: cluster.job_status(job) in ("SUCCEEDED", "FAILED", "STOPPED"), 300,
                 "the job's end")  # fmt: skip
        logs = cluster.ray("job", "logs", f"--address={cluster.dashboard}", job)
        assert cluster.job_status(job) == "STOPPED", logs[-3000:]
        assert "started 1 actors (2 in all)" in logs  # the elastic pool's line for node-3
        assert "checkpoint written" in logs, logs[-3000:]  # SIGTERM → the final checkpoint
        payload = load_checkpoint(run_dir)
        assert payload["counters"]["env_steps"] > 0 and payload["learner"]["updates"] > 0
    finally:
        cluster.stop()
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-af", f"gcs_server.*{cluster.gcs_port}"],
                               capture_output=True, text=True).stdout  # fmt: skip
    assert "gcs_server" not in leftovers, leftovers


def _updates(run_dir) -> int:
    """The learner's updates in the run's latest metrics record (0 before the first)."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return max((json.loads(line).get("counters/updates", 0) for line in lines), default=0)

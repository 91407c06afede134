"""Several machines, proven on one: two DeepSpeed "nodes" on the loopback, each its own `deepspeed` launcher
(`--hostfile` of two entries, `--no_ssh --node_rank N --master_addr 127.0.0.1 --master_port P`: DeepSpeed's own
multi-node path without ssh), one CPU rank each, training LoRA on a tiny model. The loss curve equals one rank's
with the same global batch; each checkpoint is written once (every rank's own state in it); a node killed mid-run
stops the other within a minute with one line, and --resume on both nodes continues exactly; a data file missing on
one node stops both before training, one line naming it."""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, free_port, launch, metrics_of, remove_shared_memory_buffers

STEPS, SAVE_EVERY = 30, 3


def train_args(model_dir, out, batch, *extra):
    return ["--model_dir", model_dir, "--output_dir", out, "--prompt_text", "抽取：", "--max_len", 128,
            "--max_src_len", 100, "--fp32", "--log_steps", 1, "--max_steps", STEPS, "--save_steps", SAVE_EVERY,
            "--keep_checkpoints", 0, "--train_batch_size", batch, "--lora_r", 8, "--lora_dropout", 0,
            "--learning_rate", 1e-2, *extra]


class Nodes:
    """The two nodes' launchers, each in a process session of its own (so that one can be killed whole)."""

    def __init__(self, tmp_path, model_dir, out, node_args=None):
        self.port = free_port()
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only: --no_ssh never resolves them
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        self.logs = [open(tmp_path / f"node{n}.log", "w+") for n in range(2)]
        self.processes = []
        for node in range(2):
            args = (node_args or {}).get(node, train_args(model_dir, out, 2))
            command = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                       "--master_addr", "127.0.0.1", "--master_port", str(self.port),
                       os.path.join(ROOT, "finetuning_lora.py"), *map(str, args)]
            self.processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.logs[node],
                                                   stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, timeout=600):
        deadline = time.time() + timeout
        for process in self.processes:
            process.wait(timeout=max(1, deadline - time.time()))
        return [self.output(n) for n in range(2)]

    def output(self, node):
        self.logs[node].flush()
        with open(self.logs[node].name, errors="replace") as f:
            return f.read()

    def kill(self, node):
        os.killpg(self.processes[node].pid, signal.SIGKILL)

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in self.logs:
            log.close()
        remove_shared_memory_buffers(self.port)


def errors(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def losses_by_step(out):
    """The last logged loss of each step (a resumed run logs again the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in metrics_of(out) if "loss" in r}


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one-rank"))
    launch("finetuning_lora.py", *train_args(tiny_model_dir, out, 4), launcher=False)  # the same global batch
    return out


def test_two_nodes_follow_one_rank_and_a_killed_node_stops_the_other_and_both_resume(one_rank, tiny_model_dir,
                                                                                    tmp_path):
    out = str(tmp_path / "run")
    nodes = Nodes(tmp_path, tiny_model_dir, out)
    try:
        deadline = time.time() + 300
        while not os.path.isfile(os.path.join(out, "latest")) and time.time() < deadline:
            assert nodes.processes[0].poll() is None, nodes.output(0)[-3000:]
            time.sleep(0.2)
        assert os.path.isfile(os.path.join(out, "latest")), nodes.output(0)[-3000:]
        killed_at = time.time()
        nodes.kill(1)  # node b's launcher and its rank, as a machine that went down
        nodes.processes[0].wait(timeout=90)
        stopped_after = time.time() - killed_at
        survivor = nodes.output(0)
    finally:
        nodes.close()
    assert stopped_after < 60, survivor[-3000:]
    lines = errors(survivor)
    assert len(lines) == 1 and "another process of this run is gone" in lines[0] and "--resume" in lines[0], \
        survivor[-3000:]
    saved = sorted((n for n in os.listdir(out) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))
    assert saved and int(saved[-1].split("-")[1]) < STEPS
    first = os.path.join(out, saved[0])
    names = os.listdir(first)
    # written once, by the two ranks together: rank 0's files and each rank's own state
    assert {"adapter_model.safetensors", "rng_state_0.safetensors", "rng_state_1.safetensors",
            "optimizer_shard_0.safetensors", "optimizer_shard_1.safetensors"} <= set(names), names
    assert json.load(open(os.path.join(first, "training_args.json")))["world_size"] == 2
    resumed = Nodes(tmp_path, tiny_model_dir, out, node_args={n: train_args(tiny_model_dir, out, 2, "--resume")
                                                              for n in range(2)})
    try:
        outputs = resumed.wait()
    finally:
        resumed.close()
    assert all(p.returncode == 0 for p in resumed.processes), outputs[0][-3000:] + outputs[1][-3000:]
    assert "resumed from" in outputs[0]
    two, reference = losses_by_step(out), losses_by_step(one_rank)
    assert sorted(two) == sorted(reference) == list(range(1, STEPS + 1))
    assert [two[s] for s in sorted(two)] == pytest.approx([reference[s] for s in sorted(reference)], abs=1e-4)


def test_a_data_file_missing_on_one_node_stops_both_before_training(tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    missing = str(tmp_path / "on-node-b-only.jsonl")
    node_args = {0: train_args(tiny_model_dir, out, 2),
                 1: train_args(tiny_model_dir, out, 2) + ["--train_path", missing]}
    start = time.time()
    nodes = Nodes(tmp_path, tiny_model_dir, out, node_args)
    try:
        outputs = nodes.wait(timeout=240)
    finally:
        nodes.close()
    assert time.time() - start < 120
    assert all(p.returncode != 0 for p in nodes.processes)
    for node, text in enumerate(outputs):
        lines = errors(text)
        assert len(lines) == 1 and f"{missing}: file not found" in lines[0], text[-3000:]
        assert "trainable parameters" not in text  # before any weights loaded
    assert "rank 1 on node 1" in errors(outputs[0])[0] and "stops with it" in errors(outputs[0])[0]

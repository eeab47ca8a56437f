"""The README's torchrun lines for one machine meet on loopback and open no port but the one they name.

``--standalone`` (and a plain ``torchrun --nproc_per_node=N`` on one node, which falls back to it) hosts its
rendezvous on two random ports of every interface. PyTorch's TCPStore listens on all interfaces whatever
address it is given, so the documented line cannot avoid one such port; it must not open more.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import servers

REPO = Path(__file__).resolve().parents[1]

# Stands in for the stage script: joins the process group as a stage does, then rank 0 lists the TCP
# sockets that torchrun's agent and its workers listen on (from /proc, by socket inode).
PROBE = textwrap.dedent("""
    import ipaddress, json, os, sys
    import torch.distributed as dist

    def address(hex_addr):
        host, port = hex_addr.split(":")
        raw = bytes.fromhex(host)
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc: 32-bit words, host order
        return str(ipaddress.ip_address(raw)), int(port, 16)

    def listening(pids):
        inodes = set()
        for pid in pids:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        found = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for row in open(table).read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.append(address(fields[1]))
        return found

    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        agent = os.getppid()
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/stat")
                   and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(agent)]
        json.dump(listening([agent, *workers]), open(sys.argv[1], "w"))
    dist.barrier()
    dist.destroy_process_group()
""")


def documented_lines() -> list[list[str]]:
    """The torchrun command lines of the README's bash block on torchrun, split as a shell would."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### torchrun", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [words for words in lines if "torchrun" in words]


def _parse(words: list[str]) -> tuple[dict[str, str], object]:
    from torch.distributed.run import get_args_parser

    at = words.index("torchrun")
    env = dict(word.split("=", 1) for word in words[:at])
    return env, get_args_parser().parse_args(words[at + 1:])


def test_documented_torchrun_lines_meet_on_loopback():
    lines = documented_lines()
    assert len(lines) == 2
    for words in lines:
        env, args = _parse(words)
        # torchrun replaces a static rendezvous without a port by --standalone's on one node
        assert not args.standalone and args.rdzv_backend == "static" and args.master_port is not None, words
        assert ipaddress.ip_address(args.master_addr).is_loopback, words
        assert env.get("GLOO_SOCKET_IFNAME") == "lo", words  # gloo's own sockets: else the hostname's address
        assert (REPO / args.training_script).is_file(), words


@pytest.mark.slow  # torchrun and two workers each import torch: ~15-25 s on 2 busy cores
def test_documented_torchrun_line_listens_beyond_loopback_only_on_its_master_port(tmp_path):
    port = servers.free_port()  # the documented 29500 may be taken on a shared machine
    words = [f"--master_port={port}" if w.startswith("--master_port=") else w for w in documented_lines()[0]]
    env, args = _parse(words)
    at = words.index("torchrun")
    (tmp_path / "probe.py").write_text(PROBE)
    command = [sys.executable, "-m", "torch.distributed.run", *words[at + 1:-1], "probe.py", "listening.json"]
    proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listening = json.loads((tmp_path / "listening.json").read_text())
    assert [port] == [p for host, p in listening if host in ("0.0.0.0", "::")], listening  # the TCPStore
    assert all(ipaddress.ip_address(host).is_loopback for host, p in listening if p != port), listening

"""Transcripts in the docs, run for real and compared with what the docs show.

A fenced block that follows a marker line

    <!-- checked: SETUP -->

is a transcript: ``$ COMMAND`` lines are typed at a shell, the lines up to the next
``$`` are what the command prints (stdout and stderr as a terminal shows them). In a
session of ``chat_client.py`` or ``batos.py shell``, lines starting with the prompt
(``batos> ``, ``>>> ``) are typed into it. SETUP says what ran before, in the same
words as the doc: ``demo kernel`` (``batos.py --demo`` on a new image), then
optionally ``, after <chat_client.py arguments>`` and ``, offline`` (the kernel
stopped before the transcript runs).

Output is compared after replacing what differs from run to run (cycle and boot
ids, times, ports, PIDs, paths of the image and its socket) and runs of spaces.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pexpect
from kernel_process import BATOS, CHAT_CLIENT, PYTHON, KernelProcess, run_env

MARKER = re.compile(r"^<!-- checked: (?P<setup>.+?) -->\n```[a-z]*\n(?P<body>.*?)^```",
                    re.MULTILINE | re.DOTALL)
PROMPTS = {"chat_client.py": "batos> ", "shell": ">>> "}
_VARIABLE = [
    (re.compile(r"\x1b\[[0-9;]*[A-Za-z]"), ""),
    (re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}"), "<CYCLE>"),
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?"), "<TIME>"),
    (re.compile(r"\bboot [0-9a-f]{12,32}\b"), "boot <BOOT>"),
    (re.compile(r"tcp://127\.0\.0\.1:\d+"), "<ENDPOINT>"),
    (re.compile(r"\bPID \d+"), "PID <PID>"),
    (re.compile(r"\S*/live_image\.fs"), "<IMAGE>"),
    (re.compile(r"unix socket \S+\.sock"), "unix socket <SOCKET>"),
    (re.compile(r"\b\d+\.\d+s\b"), "<SECONDS>"),
]


@dataclass
class Step:
    command: str
    inputs: list[tuple[str, list[str]]] = field(default_factory=list)  # typed line, its output
    output: list[str] = field(default_factory=list)  # printed before the first prompt


@dataclass
class Transcript:
    doc: str
    setup: str
    steps: list[Step]

    @property
    def name(self) -> str:
        return f"{self.doc}: {self.steps[0].command[:60]}"


def transcripts(doc: Path) -> list[Transcript]:
    found = []
    for match in MARKER.finditer(doc.read_text()):
        steps: list[Step] = []
        for line in match.group("body").splitlines():
            if line.startswith("$ "):
                steps.append(Step(line[2:]))
                continue
            step = steps[-1]
            prompt = next((p for key, p in PROMPTS.items() if key in step.command
                           and line.startswith(p)), None)
            if prompt is not None:
                step.inputs.append((line[len(prompt):], []))
            elif step.inputs:
                step.inputs[-1][1].append(line)
            else:
                step.output.append(line)
        found.append(Transcript(doc.name, match.group("setup"), steps))
    return found


def normalise(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        line = line.split("\r")[-1] if line.rstrip("\r") else line
        for pattern, replacement in _VARIABLE:
            line = pattern.sub(replacement, line)
        out.append(" ".join(line.split()))
    while out and not out[-1]:
        out.pop()
    return out


def _argv(command: str, kernel: KernelProcess) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "python", f"transcripts run python scripts, not {words[0]!r}"
    script = {"batos.py": str(BATOS), "chat_client.py": str(CHAT_CLIENT)}[words[1]]
    rest = words[2:]
    if words[1] == "chat_client.py":
        rest = ["--endpoint", kernel.endpoint, *rest]
    elif "shell" in rest:
        rest = [*rest[: rest.index("shell") + 1], "--db", kernel.db, *rest[rest.index("shell")
                                                                             + 1:]]
    return [PYTHON, script, *rest]


def run_step(step: Step, kernel: KernelProcess) -> tuple[list[str], list[str]]:
    """(expected, actual) lines of one step."""
    argv = _argv(step.command, kernel)
    expected = [*step.output]
    if not step.inputs:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=120, env=run_env(), cwd=kernel.workdir)
        return expected, done.stdout.splitlines()
    prompt = next(p for key, p in PROMPTS.items() if key in step.command)
    child = pexpect.spawn(argv[0], argv[1:], env=run_env(), cwd=str(kernel.workdir),
                          encoding="utf-8", timeout=60, dimensions=(50, 300), echo=False)
    actual: list[str] = []
    try:
        child.expect_exact(prompt)
        actual += child.before.splitlines()
        for typed, output in step.inputs:
            expected += [prompt + typed, *output]
            child.sendline(typed)
            child.expect_exact(prompt)
            actual += [prompt + typed, *child.before.splitlines()]
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return expected, actual


def setup_kernel(transcript: Transcript, workdir: Path) -> KernelProcess:
    """A demo kernel on a new image, prepared as the marker says (see the module doc)."""
    parts = [p.strip() for p in transcript.setup.split(",")]
    assert parts[0] == "demo kernel", transcript.setup
    kernel = KernelProcess(workdir).start()
    for part in parts[1:]:
        if part.startswith("after "):
            done = kernel.chat(*shlex.split(part.removeprefix("after ")))
            assert done.returncode == 0, done.stderr
        elif part == "offline":
            kernel.stop()
        else:
            raise AssertionError(f"unknown setup {part!r} in {transcript.setup!r}")
    return kernel

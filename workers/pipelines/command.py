"""``command`` pipelines: a research model's own CLI and environment as a job kind.

An administrator declares one per ``[pipelines.<name>]`` table; users submit jobs of
kind ``<name>`` like any other. Top to bottom, a job:

1. builds the argv: no shell; an argument that is exactly a placeholder (``{input}``,
   ``{outdir}``, ``{jobdir}``, ``{prompt}``, ``{job_id}``) is replaced whole, so job
   input never becomes a command, and a prompt that looks like an option is refused;
2. runs it in its own process group with a minimal environment (no daemon secrets),
   stdout and stderr into ``command.log``; cancel and timeout kill the whole group;
3. collects the files matching ``outputs`` from ``{outdir}`` (plain files only: links
   and hidden names are skipped), the first as the result, the rest as extras, and
   shows a ``metrics.json`` the script wrote in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from daemon.config import CommandPipelineConfig, Config
from daemon.jobs import JobError
from workers import media, reports
from workers.context import JobContext, JobResult
from workers.residency import release_memory

INPUT_SUFFIXES = {
    "video": media.VIDEO_SUFFIXES,
    "image": media.IMAGE_SUFFIXES,
    "burst": media.BURST_SUFFIXES,
    "audio": (".wav", ".mp3", ".flac", ".m4a", ".ogg", ".opus"),
    "text": (".txt", ".md", ".json"),
}
PASSED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "CUDA_VISIBLE_DEVICES")
OUTPUT_DIR = "output"
LOG_FILE = "command.log"
MAX_OUTPUTS = 100
TAIL_LINES = 20
KILL_GRACE_S = 5.0


class Options(BaseModel):
    """Command pipelines take no options from users: only the administrator shapes argv."""

    model_config = ConfigDict(extra="forbid")


class CommandPipeline:
    """One ``[pipelines.<name>]`` table, with the interface of a pipeline module."""

    Options = Options

    def __init__(self, name: str, spec: CommandPipelineConfig):
        self.name = name
        self.spec = spec
        suffixes: list[str] = []
        for item in spec.inputs:
            suffixes += INPUT_SUFFIXES.get(item, (item.lower(),))
        self.INPUTS = tuple(dict.fromkeys(suffixes))

    def models(self, config: Config) -> dict[str, Path]:
        return {}  # the research code brings its own, in its own environment

    def unavailable(self, config: Config) -> str | None:
        return None  # a missing program is explained when the job runs

    def check_request(self, prompt: str, options: Options) -> None:
        if "{prompt}" in self.spec.command and prompt.startswith("-"):
            raise JobError(f"a {self.name} prompt must not start with '-': the program would "
                           "read it as an option")

    def run(self, job: JobContext) -> JobResult:
        spec = self.spec
        inputs = [job.inputs_dir / name for name in job.spec.inputs]
        if spec.inputs and not inputs:
            raise JobError(f"a {self.name} job needs an input file "
                           f"({', '.join(self.INPUTS)})")
        outdir = job.dir / OUTPUT_DIR
        _empty_dir(outdir)  # a rerun must not pick up a crashed run's leftovers
        values = {"{input}": str(inputs[0]) if inputs else "", "{outdir}": str(outdir),
                  "{jobdir}": str(job.dir), "{prompt}": job.spec.prompt,
                  "{job_id}": job.spec.id}
        argv = [values.get(arg, arg) for arg in spec.command]
        environment = {k: os.environ[k] for k in PASSED_ENVIRONMENT if k in os.environ}
        environment.update(spec.env)
        if spec.gpu:
            # The command brings its own models: give it the card.
            release_memory(job.gpu.resident)

        with job.stage("run"):
            exit_code = self._execute(job, argv, environment)
        tail = _tail(job.dir / LOG_FILE)
        if exit_code != 0:
            raise JobError(f"{self.name} exited with status {exit_code}; the last lines it "
                           f"printed:\n{tail}")
        outputs, skipped = collect_outputs(outdir, spec.outputs)
        for name in skipped:
            job.warn(f"skipped {name!r} in the output folder: not a plain file")
        if not outputs:
            raise JobError(f"{self.name} finished but wrote no file matching "
                           f"{', '.join(spec.outputs)} into its output folder")
        metrics = _metrics(outdir / "metrics.json", job)
        relative = [str(path.relative_to(job.dir)) for path in outputs]
        details = {"pipeline": self.name, "command": argv, "exit_code": exit_code,
                   "outputs": relative, "metrics": metrics, "log_tail": tail.splitlines()}
        previews = {path.name: media.read_image(path) for path in outputs
                    if path.suffix.lower() in media.IMAGE_SUFFIXES}
        reports.write_still(job, {}, details, previews, title=self.name)
        return JobResult(primary=relative[0], extras=relative[1:])

    def _execute(self, job: JobContext, argv: list[str], environment: dict[str, str]) -> int:
        job.log("command started", argv=argv)
        try:
            with open(job.dir / LOG_FILE, "wb") as log:
                process = subprocess.Popen(argv, cwd=self.spec.cwd, env=environment,
                                           stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            raise JobError(f"{self.name}: the program {argv[0]!r} (or the folder "
                           f"{self.spec.cwd}) does not exist; check [pipelines.{self.name}] "
                           "in the config") from None
        except PermissionError:
            raise JobError(f"{self.name}: {argv[0]!r} is not executable") from None
        started = time.monotonic()
        try:
            while process.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > self.spec.timeout:
                    raise JobError(f"{self.name} ran longer than its timeout "
                                   f"({self.spec.timeout:.0f} s) and was stopped; the last "
                                   f"lines it printed:\n{_tail(job.dir / LOG_FILE)}")
                job.progress("run", 10, f"{self.name} running for {elapsed:.0f} s")
                time.sleep(0.2)
        except BaseException:  # cancel, timeout, worker shutdown: take the group down
            _kill_group(process)
            raise
        job.log("command finished", exit_code=process.returncode,
                seconds=round(time.monotonic() - started, 3))
        return process.returncode


def collect_outputs(outdir: Path, patterns: list[str]) -> tuple[list[Path], list[str]]:
    """Plain files in ``outdir`` matching ``patterns``, in pattern order; and what was
    skipped (links, folders, hidden names)."""
    found: list[Path] = []
    skipped: list[str] = []
    for pattern in patterns:
        for path in sorted(outdir.glob(pattern)):
            if path in found or path.name in skipped:
                continue
            if path.name.startswith(".") or path.is_symlink() or not path.is_file():
                skipped.append(path.name)
                continue
            found.append(path)
    return found[:MAX_OUTPUTS], skipped


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _empty_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return "(nothing)"
    return "\n".join(lines[-TAIL_LINES:]) or "(nothing)"


def _metrics(path: Path, job: JobContext) -> dict[str, object] | None:
    if not path.is_file() or path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        job.warn("metrics.json is not valid JSON; it was left out of the report")
        return None
    if not isinstance(data, dict):
        job.warn("metrics.json is not a JSON object; it was left out of the report")
        return None
    return data

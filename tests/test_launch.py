"""The launch scripts pass every user value (CONFIG, WORKDIR, OUT, extra flags, ARGS, ...) as
exactly one word, also inside the command string a TPU worker's shell parses, and run nothing
else: payloads with spaces, `;`, `$(...)`, backticks, quotes, `&&`, `|`, `*`, `~` and newlines.

No gcloud, srun or trainer runs: stub executables on PATH (gcloud, srun, python, python3, git, and
a worker's `dino_jax/.venv/bin/{python,pip}`) record their argv. The gcloud stub runs its
`--command=` string with `bash -c` or `sh -c` (dash) in a fake worker home, as the worker does.
A payload that a shell would run touches a file in `pwned/`, which must stay empty."""
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TIMEOUT = 60

STUB = """#!/bin/bash
# Records its name and arguments (NUL-separated), in call order, in $LAUNCH_TEST_RECORD.
record=$(mktemp "$LAUNCH_TEST_RECORD/$(date +%s%N).XXXXXX")
printf '%s\\0' "${0##*/}" "$@" > "$record"
"""
GCLOUD_STUB = STUB + """for arg; do
  if [[ $arg == --command=* ]]; then cd "$LAUNCH_TEST_WORKER" && exec "$LAUNCH_TEST_WORKER_SHELL" -c "${arg#--command=}"; fi
done
"""
SRUN_STUB = STUB + """while [[ $1 == -* ]]; do shift; done
exec "$@"
"""


def payloads(pwned):
  """Values that would run `touch pwned/NAME` (or be split or expanded) if a shell parsed them unquoted."""
  return {
      "space": "my run",
      "semicolon": f"x; touch {pwned}/semicolon",
      "dollar_paren": f"$(touch {pwned}/dollar_paren)",
      "backticks": f"`touch {pwned}/backticks`",
      "quotes": "it's \"quoted\"",
      "single_quote_break": f"a' ; touch {pwned}/single_quote_break ; '",
      "double_quote_break": f'a" ; touch {pwned}/double_quote_break ; "',
      "and": f"a && touch {pwned}/and",
      "pipe": f"a | touch {pwned}/pipe",
      "glob": "*",
      "tilde_and_var": "~/x$HOME${PATH}",
      "backslash": "back\\slash \\n",
      "leading_dash_equals": "-=x",
      "newline": f"a\ntouch {pwned}/newline",
  }


PAYLOAD_NAMES = list(payloads("P"))
ONE_LINE = [name for name in PAYLOAD_NAMES if "\n" not in payloads("P")[name]]


class Launch:
  """A sandbox: stubs first on PATH, a working folder with files (an unquoted `*` would expand
  to them), a fake TPU worker home and the pwned/ folder."""

  def __init__(self, tmp_path):
    self.tmp = tmp_path
    self.bin = tmp_path / "bin"
    self.record = tmp_path / "record"
    self.worker = tmp_path / "worker"
    self.pwned = tmp_path / "pwned"
    self.cwd = tmp_path / "cwd"
    for folder in (self.bin, self.record, self.pwned, self.cwd, self.worker / "dino_jax" / ".venv" / "bin"):
      folder.mkdir(parents=True)
    for name in ("a_file", "b_file"):
      (self.cwd / name).write_text("")
    stubs = {self.bin / "gcloud": GCLOUD_STUB, self.bin / "srun": SRUN_STUB}
    for name in ("python", "python3", "git"):
      stubs[self.bin / name] = STUB
    for name in ("python", "pip"):
      stubs[self.worker / "dino_jax" / ".venv" / "bin" / name] = STUB
    for path, text in stubs.items():
      path.write_text(text)
      path.chmod(0o755)
    self.payloads = payloads(self.pwned)

  def env(self, dry, worker_shell="bash", **variables):
    env = {"PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.tmp), "LANG": "C.UTF-8",
           "LAUNCH_TEST_RECORD": str(self.record), "LAUNCH_TEST_WORKER": str(self.worker),
           "LAUNCH_TEST_WORKER_SHELL": worker_shell, "SLURM_SUBMIT_DIR": str(REPO)}
    if dry:
      env["DRY_RUN"] = "1"
    env.update(variables)
    return env

  def run(self, script, *args, dry, worker_shell="bash", expect_rc=0, **variables):
    result = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=self.cwd, capture_output=True, text=True,
                            timeout=TIMEOUT, env=self.env(dry, worker_shell, **variables))
    assert result.returncode == expect_rc, (result.returncode, result.stdout, result.stderr)
    return result

  def calls(self):
    """The stubs' argv, in call order; each call's record is removed."""
    calls = []
    for path in sorted(self.record.iterdir()):
      calls.append(path.read_bytes().decode().split("\0")[:-1])
      path.unlink()
    return calls

  def assert_nothing_ran(self):
    assert sorted(os.listdir(self.pwned)) == []
    assert self.calls() == []

  def printed(self, stdout):
    """The dry run's `+ ...` commands, each parsed by Python's shlex and by bash (eval in the
    working folder, where an unquoted * would expand); the two must agree."""
    commands = []
    for line in stdout.splitlines():
      if not line.startswith("+ "):
        continue
      words = shlex.split(line[2:])
      by_bash = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line[2:]],
                               cwd=self.cwd, capture_output=True, text=True, timeout=TIMEOUT, env=self.env(dry=False))
      assert by_bash.returncode == 0, by_bash.stderr
      assert by_bash.stdout.split("\0")[:-1] == words
      commands.append(words)
    assert sorted(os.listdir(self.pwned)) == []
    return commands

  def on_worker(self, command, shell):
    """What a worker's shell runs for the --command string: the argv its stubs record."""
    result = subprocess.run([shell, "-c", command], cwd=self.worker, capture_output=True, text=True,
                            timeout=TIMEOUT, env=self.env(dry=False))
    assert result.returncode == 0, (result.stdout, result.stderr)
    return self.calls()


@pytest.fixture
def launch(tmp_path):
  return Launch(tmp_path)


def train_argv(config, workdir, *extra, python="python", distributed=False):
  return [python, "-m", "dino_jax.train", *(["--distributed"] if distributed else []),
          "--config", config, "--workdir", workdir, *extra]


# ---- common.sh -------------------------------------------------------------------------------

@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_quote_words_round_trips_through_bash_and_sh(launch, shell):
  words = [*launch.payloads.values(), "", "plain", "--config.x=1", "'", "''", "\\", "$", "!x", "a\tb", "é ü", "%", "#x",
           "{a,b}", "=x", "a=b c", "-"]
  quoted = subprocess.run(["bash", "-c", 'source "$1"; shift; quote_words "$@"', "_", str(LAUNCH / "common.sh"), *words],
                          capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
  back = subprocess.run([shell, "-c", f'set -- {quoted}; for w; do printf "%s\\0" "$w"; done'], cwd=launch.cwd,
                        capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
  assert back.split("\0")[:-1] == words
  assert sorted(os.listdir(launch.pwned)) == []
  if shell == "bash":
    assert shlex.split(quoted) == words


@pytest.mark.parametrize("value,dry", [("1", True), ("yes", True), ("true", True), ("0", False), ("", False)])
def test_dry_run_values(launch, value, dry):
  """DRY_RUN set to anything but empty or 0 only prints."""
  env = launch.env(dry=False, DRY_RUN=value, CONFIG="c", WORKDIR="w")
  result = subprocess.run(["bash", str(LAUNCH / "gpu_host.sh")], cwd=launch.cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
  assert result.returncode == 0, result.stderr
  assert launch.printed(result.stdout) == [train_argv("c", "w")]
  assert launch.calls() == ([] if dry else [train_argv("c", "w")])


# ---- tpu_pod.sh --------------------------------------------------------------------------------

TPU = {"TPU": "pod", "ZONE": "us-central2-b"}


def gcloud_ssh_all(command):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b", "--worker=all",
          f"--command={command}"]


def tpu_train(config, workdir, *extra):
  return train_argv(config, workdir, *extra, distributed=True)


@pytest.mark.parametrize("shell", ["bash", "sh"])
@pytest.mark.parametrize("name", ONE_LINE)
def test_tpu_pod_run_dry_run(launch, name, shell):
  """The printed gcloud command, parsed and its --command run by the worker's shell, starts the
  trainer with exactly CONFIG, WORKDIR and the extra arguments as words; nothing else runs."""
  value = launch.payloads[name]
  config, workdir, extra = f"configs/{value}.py", value, [f"--config.name={value}", value]
  for subcommand in ("run", "resume"):
    result = launch.run("tpu_pod.sh", subcommand, *extra, dry=True, CONFIG=config, WORKDIR=workdir, **TPU)
    launch.assert_nothing_ran()
    [gcloud] = launch.printed(result.stdout)
    assert gcloud[:-1] == gcloud_ssh_all("")[:-1]
    assert gcloud[-1].startswith("--command=cd dino_jax && ")
    assert f"# each worker runs: {gcloud[-1][len('--command='):]}" in result.stdout
    assert launch.on_worker(gcloud[-1][len("--command="):], shell) == [tpu_train(config, workdir, *extra)]
    assert sorted(os.listdir(launch.pwned)) == []


@pytest.mark.parametrize("shell", ["bash", "sh"])
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_tpu_pod_run_on_workers(launch, name, shell):
  """Not a dry run: the gcloud stub hands --command to the worker's shell (bash or dash)."""
  value = launch.payloads[name]
  config, workdir, extra = f"configs/{value}.py", value, [f"--config.name={value}", value]
  launch.run("tpu_pod.sh", "run", *extra, dry=False, worker_shell=shell, CONFIG=config, WORKDIR=workdir, **TPU)
  calls = launch.calls()
  assert len(calls) == 2
  assert calls[0][:-1] == gcloud_ssh_all("")[:-1]
  assert calls[1] == tpu_train(config, workdir, *extra)
  assert sorted(os.listdir(launch.pwned)) == []


def test_tpu_pod_args_split_at_whitespace_only(launch):
  """ARGS is split at spaces, tabs and newlines; no globbing, expansion or command runs; its
  words go before the arguments."""
  p = launch.pwned
  args = f"--a=1  ;touch\t{p}/semicolon $(touch {p}/dollar) `touch {p}/tick` && * ~ $HOME\n|touch {p}/pipe --b=2"
  result = launch.run("tpu_pod.sh", "run", "--c=3", dry=True, WORKDIR="/shared/w", ARGS=args, **TPU)
  launch.assert_nothing_ran()
  [gcloud] = launch.printed(result.stdout)
  expected = tpu_train("configs/dinov2_vitl14.py", "/shared/w", *args.split(), "--c=3")
  assert launch.on_worker(gcloud[-1][len("--command="):], "bash") == [expected]
  launch.run("tpu_pod.sh", "run", "--c=3", dry=False, WORKDIR="/shared/w", ARGS=args, **TPU)
  assert launch.calls()[1:] == [expected]
  assert sorted(os.listdir(launch.pwned)) == []


@pytest.mark.parametrize("args", ["--config.name='my run'", '--config.name="my run"', "--config.name=my\\ run",
                                  "--x=it's"])
def test_tpu_pod_args_with_quotes_refused(launch, args):
  """Quotes or backslashes in ARGS would reach the trainer as they are: exit 2, nothing runs."""
  result = launch.run("tpu_pod.sh", "run", dry=False, WORKDIR="w", ARGS=args, expect_rc=2, **TPU)
  assert "ARGS is split at whitespace only" in result.stderr
  assert "give such flags as arguments" in result.stderr
  launch.assert_nothing_ran()


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("name", ONE_LINE)
def test_tpu_pod_setup_repo_url(launch, name, dry):
  url = f"https://example.com/{launch.payloads[name]}.git"
  result = launch.run("tpu_pod.sh", "setup", dry=dry, REPO_URL=url, **TPU)
  if dry:
    launch.assert_nothing_ran()
    [gcloud] = launch.printed(result.stdout)
    worker = launch.on_worker(gcloud[-1][len("--command="):], "bash")
  else:
    worker = launch.calls()[1:]
  assert worker == [["git", "clone", url, "dino_jax"], ["python3", "-m", "venv", ".venv"],
                    ["pip", "install", "-e", ".", "jax[tpu]"]]
  assert sorted(os.listdir(launch.pwned)) == []


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("name", ONE_LINE)
def test_tpu_pod_local_commands(launch, name, dry):
  """create, ssh and delete pass TPU, ZONE, TYPE, RUNTIME and WORKER to gcloud as single words."""
  v = launch.payloads[name]
  env = {"TPU": f"pod {v}", "ZONE": f"zone {v}", "TYPE": f"type {v}", "RUNTIME": f"rt {v}", "WORKER": f"w {v}"}
  expected = {
      "create": ["gcloud", "compute", "tpus", "tpu-vm", "create", env["TPU"], f"--zone={env['ZONE']}",
                 f"--accelerator-type={env['TYPE']}", f"--version={env['RUNTIME']}"],
      "ssh": ["gcloud", "compute", "tpus", "tpu-vm", "ssh", env["TPU"], f"--zone={env['ZONE']}", f"--worker={env['WORKER']}"],
      "delete": ["gcloud", "compute", "tpus", "tpu-vm", "delete", env["TPU"], f"--zone={env['ZONE']}"],
  }
  for subcommand, argv in expected.items():
    result = launch.run("tpu_pod.sh", subcommand, dry=dry, **env)
    assert launch.printed(result.stdout) == [argv]
    assert launch.calls() == ([] if dry else [argv])
  assert sorted(os.listdir(launch.pwned)) == []


@pytest.mark.parametrize("subcommand", ["create", "setup", "ssh", "delete"])
def test_tpu_pod_arguments_only_for_run(launch, subcommand):
  result = launch.run("tpu_pod.sh", subcommand, "--config.x=1", dry=False, expect_rc=2, **TPU)
  assert "usage:" in result.stderr
  launch.assert_nothing_ran()


# ---- gpu_host.sh, slurm.sbatch, local_cpu.sh ----------------------------------------------------

@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_gpu_host(launch, name, dry):
  v = launch.payloads[name]
  config, workdir, extra = f"configs/{v}.py", v, [f"--config.name={v}", v]
  result = launch.run("gpu_host.sh", *extra, dry=dry, CONFIG=config, WORKDIR=workdir)
  expected = train_argv(config, workdir, *extra)
  if name in ONE_LINE:
    assert launch.printed(result.stdout) == [expected]
  assert launch.calls() == ([] if dry else [expected])
  assert sorted(os.listdir(launch.pwned)) == []


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_slurm(launch, name, dry):
  """srun gets the trainer's argv as words (the stub then runs it, as srun does on each node)."""
  v = launch.payloads[name]
  config, workdir, extra = f"configs/{v}.py", v, [f"--config.name={v}", v]
  result = launch.run("slurm.sbatch", *extra, dry=dry, CONFIG=config, WORKDIR=workdir)
  trainer = train_argv(config, workdir, *extra, distributed=True)
  srun = ["srun", "--kill-on-bad-exit=1", *trainer]
  if name in ONE_LINE:
    assert launch.printed(result.stdout) == [srun]
  assert launch.calls() == ([] if dry else [srun, trainer])
  assert sorted(os.listdir(launch.pwned)) == []


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_local_cpu(launch, name, dry):
  v = launch.payloads[name]
  config, workdir, extra = f"configs/{v}.py", v, [f"--config.name={v}", v]
  source = "--config.data.source=fashion_mnist_demo"
  result = launch.run("local_cpu.sh", *extra, dry=dry, CONFIG=config, WORKDIR=workdir)
  one = train_argv(config, workdir, source, *extra)
  if name in ONE_LINE:
    assert launch.printed(result.stdout) == [one]
  assert launch.calls() == ([] if dry else [one])

  result = launch.run("local_cpu.sh", *extra, dry=dry, CONFIG=config, WORKDIR=workdir, PROCESSES="2", PORT="12345")
  several = [train_argv(config, workdir, source, "--distributed", "--coordinator_address=localhost:12345",
                        "--num_processes=2", f"--process_id={i}", *extra) for i in range(2)]
  if name in ONE_LINE:
    assert launch.printed(result.stdout) == several
  assert sorted(launch.calls()) == ([] if dry else several)
  assert sorted(os.listdir(launch.pwned)) == []


@pytest.mark.parametrize("variable", ["PROCESSES", "DEVICES", "PORT"])
def test_local_cpu_numbers_checked(launch, variable):
  """PROCESSES goes into bash arithmetic, where a[$(cmd)] would run cmd; DEVICES and PORT into flags:
  anything but a whole number is refused."""
  numbers = {"PROCESSES": "2", variable: f"x[$(touch {launch.pwned}/arithmetic)]"}
  result = launch.run("local_cpu.sh", dry=True, expect_rc=2, **numbers)
  assert f"error: {variable} must be a whole number" in result.stderr
  launch.assert_nothing_ran()


# ---- bench_gpu.sh ------------------------------------------------------------------------------

@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_bench_gpu(launch, name, dry):
  v = launch.payloads[name]
  config, out, profile = f"configs/{v}.py", f"out {v}", f"profile {v}"
  result = launch.run("bench_gpu.sh", "against", "bench", "noscan", "max_batch", dry=dry, CONFIG=config, OUT=out,
                      PROFILE=profile, XLA_FLAGS=f"--flag={v}")
  bench = ["python3", "-m", "dino_jax.bench", "--config", config, "--config.batch_size=32", "--config.model.dtype=bfloat16",
           "--config.model.attention=xla", "--json", f"{out}/bench_gpu.jsonl"]
  steps = ["--steps", "5", "--warmup", "2"]
  full = "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"
  expected = [["env", "XLA_PYTHON_CLIENT_PREALLOCATE=false", *bench, "--against_pytorch", *steps],
              ["env", full, *bench, *steps, "--profile_dir", profile],
              ["env", full, *bench, "--config.model.scan=False", *steps],
              ["env", full, f"XLA_FLAGS=--flag={v} --xla_gpu_autotune_level=0", *bench, "--find_max_batch"]]
  if name in ONE_LINE:
    assert launch.printed(result.stdout) == expected
  assert launch.calls() == ([] if dry else [argv[argv.index("python3"):] for argv in expected])
  assert (launch.cwd / out).is_dir() != dry  # a dry run creates nothing
  assert sorted(os.listdir(launch.pwned)) == []


def test_stubs_shadow_real_tools(launch):
  """The sandbox never reaches a real gcloud or srun (this machine may have them)."""
  for tool in ("gcloud", "srun", "python", "python3", "git"):
    assert shutil.which(tool, path=launch.env(dry=False)["PATH"]) == str(launch.bin / tool)

"""Local multi-process JAX runs on CPU, for tests and examples: N processes on one machine, each with its own
fake CPU devices, joined by JAX's distributed runtime (gloo collectives) on loopback.

Two halves:

* :func:`launch` (the parent) picks a free loopback port, starts ``num_processes`` Python processes with
  ``--xla_force_host_platform_device_count=local_devices``, waits for all of them within ``timeout`` seconds
  (killing every one of them past it, or as soon as one fails), and returns each process's output;
* :func:`distributed_initialize` (public as ``jaxsparse.distributed_initialize``; called first thing in each
  child program) joins the run: inside a :func:`launch` it calls
  ``jax.distributed.initialize`` with the launcher's address, process count and id; on a TPU pod or a
  multi-node GPU cluster (no launcher) it calls ``jax.distributed.initialize()`` and lets JAX auto-detect the
  cluster.

The library itself has no multi-process code: programs build a mesh over ``jax.devices()`` (all processes'
devices) and XLA's collectives do the rest. From a shell::

    python -m jaxsparse._launch -n 2 -d 4 examples/multihost.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

__all__ = ["ProcessOutput", "LaunchError", "launch", "distributed_initialize", "is_launched"]

# Environment variables the launcher hands to its children.
ENV_ADDRESS = "JAXSPARSE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXSPARSE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSPARSE_PROCESS_ID"
ENV_TIMEOUT = "JAXSPARSE_LAUNCH_TIMEOUT"

LOOPBACK = "127.0.0.1"


class ProcessOutput(NamedTuple):
    """One child's exit status and its combined stdout and stderr."""

    process_id: int
    returncode: int | None  # None: killed at the timeout
    output: str


class LaunchError(RuntimeError):
    """A launched run failed or timed out; the message holds the tail of every process's output."""

    def __init__(self, message: str, outputs: list[ProcessOutput]):
        tails = "".join(
            f"\n----- process {o.process_id} (exit {o.returncode}) -----\n{o.output[-4000:]}"
            for o in outputs
        )
        super().__init__(message + tails)
        self.outputs = outputs


# ------------------------------------------------------------------------------------------------ JAX versions
def _use_gloo() -> None:
    """Gloo collectives on loopback for the CPU backend: the one place that uses JAX internals.

    jax 0.10.2 and 0.12 both name the option ``jax_cpu_collectives_implementation`` (gloo is the default) and
    both build the CPU client in ``jax._src.xla_bridge.make_cpu_client(collectives=...)``; the CPU backend factory
    is re-registered so that gloo listens on 127.0.0.1 rather than on the address of the machine's hostname.
    Must run before the first backend is created.
    """
    import jax
    from jax._src import distributed, xla_bridge
    from jax._src.lib import _jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def cpu_client():  # gloo's TCP pairs listen on the hostname's address by default: pin loopback
        gloo = _jax.make_gloo_tcp_collectives(
            distributed_client=distributed.global_state.client, hostname=LOOPBACK
        )
        return xla_bridge.make_cpu_client(collectives=gloo)

    xla_bridge.register_backend_factory("cpu", cpu_client, priority=0, fail_quietly=False)


# ------------------------------------------------------------------------------------------------ child side
def is_launched() -> bool:
    """Whether this process was started by :func:`launch`."""
    return ENV_PROCESS_ID in os.environ


def distributed_initialize() -> None:
    """Joins a multi-process run, wherever it was started: call it first thing in a program that runs on
    several processes (public as ``jaxsparse.distributed_initialize``).

    Started by ``python -m jaxsparse._launch`` (several local CPU processes, e.g. to test a multi-host program on
    one machine): joins that launcher's loopback coordinator, with gloo collectives. Anywhere else (TPU pods,
    SLURM, Open MPI, ...): ``jax.distributed.initialize()``, which detects the cluster by itself. Everything else in
    jaxsparse is the same on one process or many; ``examples/multihost.py`` is the pattern.

    Call it before any other JAX call that touches devices.

    Returns:
      ``None``; afterwards ``jax.devices()`` lists every process's devices and ``jax.process_index()`` is this
      process's id.

    Raises:
      RuntimeError: from ``jax.distributed.initialize`` (already initialized, a JAX backend already created, no
        cluster detected, or the coordinator not reached in time).

    Example:
      In a program run as several processes (``examples/multihost.py``)::

          import jaxsparse

          jaxsparse.distributed_initialize()  # before anything creates a JAX backend
          mesh = jax.make_mesh((jax.process_count(), jax.local_device_count()), ("data", "model"))

      Which way it joins depends on the launcher's environment variables, absent here:

      >>> import os
      >>> "JAXSPARSE_PROCESS_ID" in os.environ  # not started by python -m jaxsparse._launch
      False
    """
    import jax

    if not is_launched():
        jax.distributed.initialize()
        return
    address = os.environ[ENV_ADDRESS]
    timeout = int(float(os.environ.get(ENV_TIMEOUT, "300")))
    _use_gloo()
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ[ENV_NUM_PROCESSES]),
        process_id=int(os.environ[ENV_PROCESS_ID]),
        coordinator_bind_address=address,  # loopback only (the default binds every interface)
        initialization_timeout=max(timeout, 10),
        heartbeat_timeout_seconds=max(timeout, 10),
    )


# ------------------------------------------------------------------------------------------------ parent side
def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _xla_flags(local_devices: int) -> str:
    kept = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={local_devices}"])


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
    return value


def launch(
    argv: Sequence[str],
    num_processes: int = 2,
    local_devices: int = 4,
    *,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> list[ProcessOutput]:
    """Runs ``python *argv`` as ``num_processes`` processes with ``local_devices`` CPU devices each.

    Every child sees the coordinator's loopback address, the process count and its id in the environment
    (read by :func:`distributed_initialize`), plus ``env``. All children are waited for at most ``timeout`` seconds in total;
    when one fails the others are stopped at once (they would wait for it at the next collective).

    Args:
      argv: arguments after the Python interpreter: a script path and its arguments, or ``["-m", module, ...]``.
      num_processes: how many processes.
      local_devices: fake CPU devices per process (``--xla_force_host_platform_device_count``).
      timeout: wall-clock limit in seconds for the whole run.
      env: extra environment variables for every child.
      cwd: working directory of the children.

    Returns:
      One :class:`ProcessOutput` per process, in process order (all exited with status 0).

    Raises:
      LaunchError: a process exited with a nonzero status or the run timed out; every output is in the message.
    """
    num_processes = _check_positive("num_processes", num_processes)
    local_devices = _check_positive("local_devices", local_devices)
    if isinstance(argv, str) or not argv:
        raise ValueError(f"`argv` must be a non-empty sequence of strings; got {argv!r}.")
    if not timeout > 0:
        raise ValueError(f"`timeout` must be > 0 seconds; got {timeout!r}.")
    address = f"{LOOPBACK}:{free_port()}"
    base = dict(os.environ)
    base.update(env or {})
    base.update(
        {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": _xla_flags(local_devices),
            ENV_ADDRESS: address,
            ENV_NUM_PROCESSES: str(num_processes),
            ENV_TIMEOUT: str(timeout),
        }
    )
    with tempfile.TemporaryDirectory(prefix="jaxsparse-launch-") as logdir:
        logs = [open(os.path.join(logdir, f"process{i}.log"), "w+b") for i in range(num_processes)]
        procs = []
        try:
            for i in range(num_processes):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *argv],
                        env={**base, ENV_PROCESS_ID: str(i)},
                        cwd=cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=logs[i],
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, so a stop reaches its children
                    )
                )
            failed, timed_out = _wait(procs, time.monotonic() + timeout)
        finally:
            for p in procs:
                _stop(p)
            outputs = []
            for i, log in enumerate(logs):
                log.seek(0)
                text = log.read().decode("utf-8", "replace")
                log.close()
                rc = procs[i].returncode if i < len(procs) else None
                outputs.append(ProcessOutput(i, rc, text))
    if timed_out:
        raise LaunchError(f"launch timed out after {timeout:g} s: python {' '.join(argv)}", outputs)
    if failed:
        raise LaunchError(f"launch failed: python {' '.join(argv)}", outputs)
    return outputs


def _wait(procs: list[subprocess.Popen], deadline: float) -> tuple[bool, bool]:
    """Polls until all exit, one fails or the deadline passes; returns ``(failed, timed_out)``."""
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            return True, False
        if all(c == 0 for c in codes):
            return False, False
        if time.monotonic() > deadline:
            return False, True
        time.sleep(0.05)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)  # the group this launcher created for the child
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------------------------ command line
def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxsparse._launch",
        description="Run a Python program as N local JAX processes (CPU, loopback, gloo).",
    )
    parser.add_argument("-n", "--num-processes", type=int, default=2)
    parser.add_argument("-d", "--local-devices", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="script and its arguments")
    ns = parser.parse_args(args)
    argv = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
    try:
        outputs = launch(argv, ns.num_processes, ns.local_devices, timeout=ns.timeout)
    except LaunchError as e:
        print(e, file=sys.stderr)
        return 1
    for o in outputs:
        for line in o.output.splitlines():
            print(f"[{o.process_id}] {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

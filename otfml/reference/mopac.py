"""MOPAC as the reference, through ASE's MOPAC calculator: one working directory per call,
a timeout that kills the process group, SCF retries, and failures that say what went wrong."""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import subprocess
import tempfile
import time

import numpy as np
from ase import Atoms

from ..errors import ConfigError, ReferenceFailed
from ..structure import closest_pair, electron_parity_check
from .base import Label, Reference

__all__ = ["MopacReference"]

log = logging.getLogger(__name__)

_MULTIPLICITY_KEYWORDS = {1: "SINGLET", 2: "DOUBLET", 3: "TRIPLET", 4: "QUARTET",
                          5: "QUINTET", 6: "SEXTET"}
# lines of a MOPAC output that explain a failure
_MOPAC_ERROR_MARKERS = (
    "UNABLE TO ACHIEVE SELF-CONSISTENCE",
    "SCF CALCULATIONS        =          0",
    "ERROR",
    "IMPOSSIBLE",
    "NOT POSSIBLE",
    "TOO CLOSE",
    "JOB ENDED",
    "NOT RECOGNIZED",
    "CALCULATION ABANDONED",
)


#: default SCF rescue: keywords tried, one set per retry, after an SCF failure (MOPAC 22's
#: Pulay DIIS; then the Camp-King converger with a level shift).  User keywords that limit the
#: SCF (ITRY, SHIFT, PULAY, CAMP) are replaced for the retry.  The converged SCF, hence the
#: label, does not depend on how it was reached, so the fingerprint keeps the user's keywords.
SCF_RETRIES = ("PULAY", "CAMP SHIFT=20")
_SCF_KEYS = ("ITRY", "SHIFT", "PULAY", "CAMP", "KING")


def _wait(proc, timeout: float | None) -> int | None:
    """Exit code of ``proc``, or None if it still runs after ``timeout`` s.

    Returns as soon as the process exits. ``Popen.wait(timeout)`` polls with sleeps
    that double (1, 2, 4, ... 50 ms): a 32 ms MOPAC run is seen after 63 ms. A pidfd
    (Linux >= 5.3) wakes the wait at the exit itself.
    """
    if timeout is None:
        return proc.wait()
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or an old kernel: Python's polling wait
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return proc.wait() if ready else None


class _TimedShell:
    """ASE's shell execution of the MOPAC command with a wall-time limit.

    Runs the command in its own process group; at the limit the whole group is
    killed.  A run killed by a signal (timeout, OOM killer, an operator's kill)
    is reported as such.
    """

    def __init__(self, command: str, timeout: float | None) -> None:
        self.command = command
        self.timeout = timeout
        self.configvars: dict = {}

    def execute(self, calc) -> None:
        import signal

        from ase.calculators.calculator import CalculationFailed

        command = self.command.replace("PREFIX", calc.prefix)
        start = time.monotonic()  # the limit counts from the launch, however late we wait
        # what the command prints (MOPAC's banner, a shell's complaint) goes to a file of
        # the call's directory, not the terminal: failures quote it
        with open(os.path.join(calc.directory, COMMAND_LOG), "wb") as log_fh:
            proc = subprocess.Popen(command, shell=True, cwd=calc.directory,
                                    start_new_session=True, stdout=log_fh,
                                    stderr=subprocess.STDOUT)
            code = _wait(proc, None if self.timeout is None
                         else max(0.0, self.timeout - (time.monotonic() - start)))
        if code is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise _Stopped(f"MOPAC did not finish within reference.timeout_s = "
                                  f"{self.timeout:g} s and was killed; raise the timeout or "
                                  "check the structure") from None
        if code < 0 or code > 128:
            sig = -code if code < 0 else code - 128
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
            raise _Stopped(f"MOPAC was killed by signal {name} (exit code {code}): "
                                  "out of memory, a time limit, or an operator's kill")
        if code:
            what = " (the shell could not run it: command not found)" if code in (126, 127) else ""
            raise CalculationFailed(f"the MOPAC command exited with code {code}{what}")


#: file of a call's directory that takes what the MOPAC command prints
COMMAND_LOG = "command.log"


def _check_command(command: str, where: str) -> None:
    """Refuse a MOPAC command whose program does not exist, before any run starts."""
    import shlex

    try:
        program = shlex.split(command)[0]
    except (ValueError, IndexError):
        raise ConfigError(f"the MOPAC command {command!r} ({where}) cannot be parsed; give "
                          "e.g. '/path/to/mopac PREFIX.mop'") from None
    found = (os.path.isfile(program) and os.access(program, os.X_OK)) if "/" in program \
        else shutil.which(program) is not None
    if not found:
        raise ConfigError(
            f"the MOPAC command {command!r} ({where}) cannot run: {program!r} is not an "
            "executable file" + ("" if "/" in program else " on PATH") + ". Point "
            f"{where} at MOPAC, e.g. '/usr/bin/mopac PREFIX.mop' (Debian: apt-get install "
            "mopac), or unset it to use the mopac on PATH")


class MopacReference(Reference):
    """MOPAC through ASE's :class:`ase.calculators.mopac.MOPAC`, one directory per call.

    Parameters
    ----------
    method : str, default "PM7"
        Hamiltonian (PM7, PM6, AM1, ...).
    keywords : str, default ""
        Extra MOPAC keywords (e.g. ``"NOMM"``), added to ``1SCF GRADIENTS``.
    command : str, optional
        Shell command with ``PREFIX`` for the input name, e.g.
        ``"/opt/mopac/bin/mopac PREFIX.mop"``; default ``$ASE_MOPAC_COMMAND`` or
        ``mopac PREFIX.mop`` when ``mopac`` is on PATH.
    workdir : str, optional
        Where the per-call directories are made (default: the system temp dir).
    relscf : float, default 1e-4
        ASE's SCF criterion multiplier (``RELSCF``).
    keep_failed : bool, default True
        Keep the directory of a failed call (its path is in the error).
    timeout : float or None, default 600
        Wall-time limit of one MOPAC run, s; the run is killed beyond it.
    scf_retries : sequence of str
        After an SCF failure, retry with each of these keyword sets in turn
        (replacing the user's ITRY/SHIFT/PULAY/CAMP); empty: no retry.
    """

    code = "MOPAC"
    external_process = True

    def __init__(
        self,
        method: str = "PM7",
        keywords: str = "",
        command: str | None = None,
        workdir: str | None = None,
        relscf: float = 1e-4,
        keep_failed: bool = True,
        timeout: float | None = 600.0,
        scf_retries: tuple[str, ...] | list[str] = SCF_RETRIES,
    ) -> None:
        from ase.calculators.mopac import MOPAC

        method = str(method).upper()
        if method not in MOPAC.methods:
            raise ConfigError(f"MOPAC method {method!r} is not known; use one of {MOPAC.methods}")
        self.method = method
        self.keywords = " ".join(str(keywords).upper().split())
        for word in self.keywords.split():
            key = word.split("=")[0]
            if key in ("CHARGE", "UHF", *_MULTIPLICITY_KEYWORDS.values()):
                raise ConfigError(
                    f"keyword {word!r}: give charge and multiplicity as settings "
                    "(system.charge / system.multiplicity), not as MOPAC keywords")
        self.command = command or os.environ.get("ASE_MOPAC_COMMAND") or self._default_command()
        _check_command(self.command, "reference.command" if command else "ASE_MOPAC_COMMAND")
        self.workdir = workdir
        self.relscf = float(relscf)
        self.keep_failed = keep_failed
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"reference.timeout_s = {timeout!r}; it must be > 0 s (or null "
                              "for no limit)")
        self.timeout = timeout
        self.scf_retries = tuple(" ".join(str(r).upper().split()) for r in scf_retries)
        #: SCF failures rescued by a retry so far
        self.n_rescued = 0
        self._version: str | None = None

    @staticmethod
    def _default_command() -> str:
        exe = shutil.which("mopac")
        if exe is None:
            raise ConfigError(
                "MOPAC was not found: no 'mopac' on PATH and ASE_MOPAC_COMMAND is not set. "
                "Install it (Debian: apt-get install mopac) or point to it with "
                "ASE_MOPAC_COMMAND='/path/to/mopac PREFIX.mop' (or reference.command in the config)"
            )
        return f"{exe} PREFIX.mop > /dev/null 2>&1"

    @classmethod
    def from_calculator(cls, calc) -> MopacReference:
        """Wrap a configured ASE ``MOPAC`` calculator (its method, task and command)."""
        p = calc.parameters
        task = str(p.get("task", "1SCF GRADIENTS")).upper().split()
        extra = [w for w in task if w not in ("1SCF", "GRADIENTS", "DISP")]
        command = calc.command if "ASE_MOPAC_COMMAND" in os.environ else None
        return cls(method=p.get("method", "PM7"), keywords=" ".join(extra), command=command,
                   relscf=p.get("relscf", 1e-4) or 1e-4)

    @property
    def version(self) -> str | None:
        """MOPAC version, known after the first call."""
        return self._version

    def task(self, multiplicity: int, retry: str | None = None) -> str:
        """MOPAC keywords of a call (``retry``: SCF keywords replacing the user's)."""
        words = ["1SCF", "GRADIENTS", *self.keywords.split()]
        if retry is not None:
            words = [w for w in words if w.split("=")[0] not in _SCF_KEYS] + retry.split()
        if multiplicity != 1:
            if multiplicity not in _MULTIPLICITY_KEYWORDS:
                raise ConfigError(f"multiplicity={multiplicity}: MOPAC supports 1 to 6")
            words += [_MULTIPLICITY_KEYWORDS[multiplicity], "UHF"]
        return " ".join(words)

    def fingerprint(self, charge: int, multiplicity: int) -> dict:
        return {"code": self.code, "version": self._version, "method": self.method,
                "keywords": self.keywords, "charge": int(charge),
                "multiplicity": int(multiplicity)}

    def compute(self, atoms: Atoms, charge: int = 0, multiplicity: int = 1) -> Label:
        """Label ``atoms`` with MOPAC; SCF failures are retried with :attr:`scf_retries`.

        Raises
        ------
        ConfigError
            Impossible charge/multiplicity, or a periodic cell.
        ReferenceFailed
            MOPAC failed (SCF after all retries, abort, timeout, kill, unreadable
            output); the message names the step, closest atoms and MOPAC's lines.
        """
        electron_parity_check(atoms, charge, multiplicity)
        if atoms.pbc.any():
            raise ConfigError(
                "periodic cell given to the molecular MOPAC reference; set pbc=False "
                "(MOPAC's periodic mode is not supported by otfml yet)")
        t0 = time.perf_counter()
        attempts, failed_dirs = [None, *self.scf_retries], []
        for k, retry in enumerate(attempts):
            try:
                energy, forces = self._run(atoms, charge, multiplicity, retry)
                break
            except _ScfFailed as err:
                if k + 1 == len(attempts):
                    raise err.failure from None
                failed_dirs.append(err.tmp)
                log.warning("step %s: MOPAC SCF did not converge%s; retrying with %s",
                            atoms.info.get("otfml_step", "?"),
                            "" if retry is None else f" with {retry}", attempts[k + 1])
        for d in failed_dirs:  # rescued: the failed attempts are of no further interest
            shutil.rmtree(d, ignore_errors=True)
        if k:
            self.n_rescued += 1
            log.info("SCF converged on retry %d (%s)", k, attempts[k])
        return Label(energy, forces, self.fingerprint(charge, multiplicity),
                     time.perf_counter() - t0)

    def _run(self, atoms: Atoms, charge: int, multiplicity: int,
             retry: str | None) -> tuple[float, np.ndarray]:
        from ase.calculators.mopac import MOPAC

        if self.workdir:
            os.makedirs(self.workdir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="otfml-mopac-", dir=self.workdir)
        calc = MOPAC(label=os.path.join(tmp, "mopac"), command=self.command,
                     method=self.method, task=self.task(multiplicity, retry),
                     charge=int(charge), relscf=self.relscf)
        calc.profile = _TimedShell(self.command, self.timeout)
        bare = Atoms(numbers=atoms.numbers, positions=atoms.positions)
        try:
            calc.calculate(bare, ["energy", "forces"], system_changes=["positions", "numbers"])
            problem = self._scan_output(tmp)
            if problem:
                raise _ScfFailed(self._failure(tmp, atoms, problem), tmp)
            energy, forces = self._checked(atoms, calc.results["energy"], calc.results["forces"])
        except _ScfFailed:
            raise
        except ReferenceFailed as err:
            raise self._failure(tmp, atoms, str(err), isinstance(err, _Stopped)) from err
        except Exception as err:  # ASE reports MOPAC failures as parse/IO errors
            why = self._scan_output(tmp)
            if why:
                raise _ScfFailed(self._failure(tmp, atoms, why), tmp) from err
            out = os.path.join(tmp, "mopac.out")
            if os.path.exists(out):
                why = (f"MOPAC's output could not be read ({type(err).__name__}: {err}); it is "
                       "truncated, or MOPAC stopped before writing results")
            else:
                why = f"{type(err).__name__}: {err}"
            raise self._failure(tmp, atoms, why) from err
        self._version = str(calc.results.get("version", self._version))
        shutil.rmtree(tmp, ignore_errors=True)
        return energy, forces

    @staticmethod
    def _scan_output(tmp: str) -> str | None:
        out = os.path.join(tmp, "mopac.out")
        if not os.path.exists(out):
            return None
        with open(out, errors="replace") as fh:
            text = fh.read()
        if "JOB CONTINUING" in text and "UNABLE TO ACHIEVE SELF-CONSISTENCE" in text:
            return ("MOPAC SCF did not converge (UNABLE TO ACHIEVE SELF-CONSISTENCE, JOB "
                    "CONTINUING: MOPAC went on with an unconverged energy)")
        if "UNABLE TO ACHIEVE SELF-CONSISTENCE" in text:
            return "MOPAC SCF did not converge (UNABLE TO ACHIEVE SELF-CONSISTENCE)"
        if re.search(r"SCF CALCULATIONS\s*=\s*0\b", text):
            # seen with ITRY=2: "SCF FIELD WAS ACHIEVED" and a heat of formation ~140 eV off
            return ("MOPAC ran no SCF calculation (SCF CALCULATIONS = 0) yet reported an energy; "
                    "the label is meaningless (too small an ITRY?)")
        return None

    def _failure(self, tmp: str, atoms: Atoms, why: str,
                 stopped: bool = False) -> ReferenceFailed:
        """The error for a failed call (``stopped``: MOPAC was killed or timed out)."""
        lines = []
        out = os.path.join(tmp, "mopac.out")
        if os.path.exists(out):
            with open(out, errors="replace") as fh:
                lines = [ln.rstrip() for ln in fh
                         if any(m in ln.upper() for m in _MOPAC_ERROR_MARKERS)][:12]
        elif stopped:
            lines = ["(no mopac.out was written before MOPAC was stopped)"]
        else:
            lines = ["(no mopac.out was written: is the MOPAC command right?)"]
            printed = os.path.join(tmp, COMMAND_LOG)
            if os.path.exists(printed):
                with open(printed, errors="replace") as fh:
                    lines += [f"the command printed: {ln.rstrip()}" for ln in fh if ln.strip()][-5:]
        where = f"kept in {tmp}" if self.keep_failed else "removed"
        if not self.keep_failed:
            shutil.rmtree(tmp, ignore_errors=True)
        i, j, dist = closest_pair(atoms)
        return ReferenceFailed(
            f"MOPAC failed for {atoms.get_chemical_formula()} "
            f"(step {atoms.info.get('otfml_step', '?')}; shortest distance "
            f"{dist:.3f} Å between atoms {i} and {j}): {why}\n"
            f"command: {self.command}\nworking directory {where}\n"
            + ("relevant output lines:\n  " + "\n  ".join(lines) if lines else "")
        )


class _Stopped(ReferenceFailed):
    """Internal: MOPAC was killed (timeout, signal) before it finished."""


class _ScfFailed(Exception):
    """Internal: an SCF failure (may be retried); ``failure`` is the error to raise."""

    def __init__(self, failure: ReferenceFailed, tmp: str) -> None:
        super().__init__(str(failure))
        self.failure, self.tmp = failure, tmp



"""Start and stop a local backend process (``python -m backend serve``) for the add-on.

The backend runs in the Python interpreter the user names in the preferences (the one that
has torch and the backend installed), never inside Blender. It writes a connection file the
client reads; its output goes to ``backend.log`` next to that file.
"""

import os
import re
import shlex
import subprocess
import sys
import time

from .client import ConjureError

_HERE = os.path.dirname(os.path.abspath(__file__))


def backend_source_dirs():
    """Folders to put on the backend's PYTHONPATH: sources bundled in the add-on
    (``backend_src/``, made by build.py) or the repository the add-on sits in."""
    out = []
    for cand in (os.path.join(_HERE, "backend_src"), os.path.dirname(_HERE)):
        if os.path.isfile(os.path.join(cand, "backend", "__init__.py")):
            out.append(cand)
    return out


class LocalBackend:
    """One backend child process.

    Args:
        python: interpreter path (or a name on PATH such as ``python3``).
        connection_file: where the server writes its connection file.
        data_dir: job folder root (``--data-dir``); "" for the backend's default.
        device: "auto", "cuda" or "cpu" (``cpu`` hides GPUs via ``CUDA_VISIBLE_DEVICES``).
        extra_args: more ``serve`` arguments as one shell-quoted string.
    """

    def __init__(self, python, connection_file, *, data_dir="", device="auto", extra_args=""):
        self.python = python or "python3"
        self.connection_file = os.path.abspath(os.path.expanduser(connection_file))
        self.data_dir = os.path.expanduser(data_dir) if data_dir else ""
        self.device = device
        self.extra_args = extra_args or ""
        self.proc = None
        self.log_path = os.path.join(os.path.dirname(self.connection_file), "backend.log")
        self.started_at = None

    def command(self):
        cmd = [self.python, "-m", "backend", "serve", "--connection-file", self.connection_file]
        if self.data_dir:
            cmd += ["--data-dir", self.data_dir]
        cmd += shlex.split(self.extra_args)
        return cmd

    def start(self):
        """Launch the process; returns at once (the client notices when it answers).

        Raises ``ConjureError`` when the interpreter cannot be started.
        """
        if self.running:
            return
        os.makedirs(os.path.dirname(self.connection_file), exist_ok=True)
        env = dict(os.environ)
        paths = backend_source_dirs()
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        for var in ("PYTHONHOME", "PYTHONNOUSERSITE"):  # Blender's own settings must not leak in
            env.pop(var, None)
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        env["CONJURE_DEVICE"] = self.device
        try:
            old = os.stat(self.connection_file).st_mtime_ns
        except OSError:
            old = None
        self._old_stamp = old
        log = open(self.log_path, "ab")
        kwargs = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # Ctrl+C in Blender's terminal must not kill it
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=paths[0] if paths else None,
                                         **kwargs)
        except OSError as e:
            raise ConjureError("backend_start_failed",
                               "Cannot run the backend interpreter %r: %s. Set the Python path in the "
                               "Conjure preferences." % (self.python, e.strerror or e)) from None
        finally:
            log.close()
        self.started_at = time.monotonic()

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self):
        return None if self.proc is None else self.proc.poll()

    def connection_ready(self):
        """True once the server wrote a (new) connection file."""
        try:
            stamp = os.stat(self.connection_file).st_mtime_ns
        except OSError:
            return False
        return stamp != getattr(self, "_old_stamp", None)

    def log_tail(self, lines=8):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 8192))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def failure_summary(self):
        """(the log's last meaningful line, what to do about it) after the process exited early.

        The last meaningful line is the last one that is not blank, a traceback frame or a
        "Traceback"/"During handling" header, e.g. "ModuleNotFoundError: No module named 'torch'".
        """
        lines = [ln.rstrip() for ln in self.log_tail(40).splitlines()]
        line = ""
        for ln in reversed(lines):
            text = ln.strip()
            if not text or ln.startswith((" ", "\t")) or text.startswith(("Traceback", "During handling", "^")):
                continue
            line = text
            break
        if not line:
            line = "it exited with code %s and wrote nothing to its log" % self.exit_code
        # "/long/path/bin/python3.11: No module named backend" -> "python3.11: No module named backend"
        line = re.sub(r"^\S*[/\\](python[\w.]*(?:\.exe)?):", r"\1:", line)
        low = line.lower()
        where = " (log: %s)" % self.log_path
        if "no module named" in low:
            hint = ("Set Python in the Conjure preferences to an interpreter that has the backend installed "
                    "(in the Conjure folder: pip install -e .)")
        elif "address already in use" in low:
            hint = "Another program uses the backend's port: stop it, or pass another port in Extra Arguments"
        elif "data dir" in low or "not writable" in low or "permission denied" in low:
            hint = "Choose a Data Folder you can write to in the Conjure preferences"
        elif "usage:" in low or "unrecognized arguments" in low or "error: argument" in low:
            hint = "Check Extra Arguments in the Conjure preferences"
        else:
            hint = "See the log"
        return line[:300], hint + where

    def stop(self, timeout=3.0):
        """Terminate (then kill after ``timeout`` s); safe when not running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(2.0)

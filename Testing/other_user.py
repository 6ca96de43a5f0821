"""Running CBIRSlicer as another user (nobody), who may read a copy of it and write nothing of ours.

A checkout may lie in a private folder (0700, as many home folders are, and as ``.ci/run`` makes its clone): that user
cannot read it, nor the virtual environment inside it, nor an interpreter installed under /root. So the tests that
switch user arrange their own readable install, whatever the checkout: a copy of CBIRSlicerLib; for every folder of
``sys.path`` that user cannot read, a copy of the distributions CBIRSlicerLib needs at run time (found from its package
metadata; hard links where the file system allows, so it costs little); and an interpreter of the same version that
user can run, proved by running it as that user.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

NOBODY = 65534


class NoReadableInstall(RuntimeError):
    """No interpreter that user can run was found, or the copy does not import: the reason says which."""


def others_can_read(path: str) -> bool:
    """Whether a user who is neither the owner nor in the group can reach and read ``path`` (and list it, if a folder)."""
    path = os.path.realpath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if not mode & stat.S_IROTH or (stat.S_ISDIR(mode) and not mode & stat.S_IXOTH):
        return False
    folder = os.path.dirname(path)
    while True:
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return False
        if folder == os.path.dirname(folder):
            return True
        folder = os.path.dirname(folder)


def _runtime_distributions(name: str = "cbirslicer") -> list[importlib.metadata.Distribution]:
    """The installed distributions ``name`` needs at run time (its requirements without extras, and theirs)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        wanted = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if wanted in found:
            continue
        try:
            distribution = importlib.metadata.distribution(wanted)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python, not installed here
        found[wanted] = distribution
        for requirement in distribution.requires or []:
            if "extra ==" not in requirement.replace('extra=="', 'extra == "'):
                todo.append(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))
    return [d for key, d in found.items() if key != name]


def _place(source: str, target: str) -> None:
    """A hard link when the file itself is readable by others (its mode is shared: never changed here), else a copy."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.stat(source).st_mode & stat.S_IROTH:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or hard links refused
            pass
    shutil.copyfile(source, target)
    os.chmod(target, 0o755 if os.access(source, os.X_OK) else 0o644)


@dataclass
class OtherUser:
    """How to run Python as user ``uid``: the interpreter, the module path, and the folder holding the readable copies."""

    python: str
    path: list[str]
    folder: str
    uid: int = NOBODY
    copied: list[str] = field(default_factory=list)  # the sys.path folders that had to be copied (for messages)

    def command(self, *args: str) -> list[str]:
        """The command line that runs ``python args`` as that user."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", self.python, *args]

    def environment(self, home: str) -> dict[str, str]:
        """The environment of such a run: this one's, with the readable module path and the user's home."""
        kept = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV")}
        return {**kept, "PYTHONPATH": os.pathsep.join(self.path), "HOME": home, "PYTHONNOUSERSITE": "1"}

    def run(self, *args: str, home: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``python args`` as that user, from the readable folder (the caller's may be private)."""
        return subprocess.run(self.command(*args), capture_output=True, text=True, env=self.environment(home),
                              cwd=self.folder, timeout=timeout)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _readable_temporary_folder() -> str:
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(base) and others_can_read(base):
            folder = tempfile.mkdtemp(prefix="cbir-other-user-", dir=base)
            os.chmod(folder, 0o755)
            return folder
    raise NoReadableInstall("no temporary folder that another user can read")


def _interpreters() -> list[str]:
    """Interpreters of this Python's version, this one first: the venv's, its base, then the usual system places."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    names = [sys.executable, getattr(sys, "_base_executable", sys.executable), os.path.realpath(sys.executable)]
    names += [os.path.join(folder, version) for folder in ("/usr/bin", "/usr/local/bin", "/bin")]
    unique = []
    for name in names:
        if name and os.path.isfile(name) and os.path.realpath(name) not in [os.path.realpath(u) for u in unique]:
            unique.append(name)
    return unique


def readable_install(uid: int = NOBODY) -> OtherUser:
    """A readable install of CBIRSlicerLib for user ``uid`` (see the module's docstring); NoReadableInstall if none can be."""
    import CBIRSlicerLib

    folder = _readable_temporary_folder()
    try:
        package = os.path.dirname(os.path.abspath(CBIRSlicerLib.__file__))
        shutil.copytree(package, os.path.join(folder, "lib", "CBIRSlicerLib"), ignore=shutil.ignore_patterns("__pycache__"),
                        copy_function=_place)
        path, copied = [os.path.join(folder, "lib")], []
        # The parent's own standard library stays out: the interpreter that runs brings its own.
        stdlib = os.path.realpath(os.path.dirname(os.__file__))
        needed = _runtime_distributions()
        for n, entry in enumerate(sys.path):
            real = os.path.realpath(entry) if entry else ""
            if not real or not os.path.isdir(real):
                continue
            if (real == stdlib or real.startswith(stdlib + os.sep)) and "-packages" not in real:
                continue
            if real.startswith(os.path.dirname(package) + os.sep) or real == os.path.dirname(package):
                continue  # the package's own folder: copied above
            if others_can_read(real):
                path.append(real)
                continue
            here = [d for d in needed if os.path.realpath(str(d.locate_file(""))) == real]
            if not here:
                continue
            target = os.path.join(folder, f"site{n}")
            for distribution in here:
                for file in distribution.files or []:
                    source = os.path.realpath(str(distribution.locate_file(file)))
                    if os.path.isfile(source) and source.startswith(real + os.sep):
                        _place(source, os.path.join(target, os.path.relpath(source, real)))
            path.append(target)
            copied.append(real)
        for dirpath, _, _ in os.walk(folder):
            os.chmod(dirpath, 0o755)  # folders made here (a checkout's umask may be 077)
        reasons = []
        for python in _interpreters():
            user = OtherUser(python, path, folder, uid, copied)
            probe = user.run("-c", "import sys, CBIRSlicerLib.cli, numpy, SimpleITK, faiss; print(sys.version_info[:2])",
                             home=folder, timeout=120)
            if probe.returncode == 0 and probe.stdout.strip() == str(tuple(sys.version_info[:2])):
                return user
            reasons.append(f"{python}: {(probe.stderr.strip().splitlines() or [probe.stdout.strip()])[-1]}")
        raise NoReadableInstall("no interpreter of this version runs CBIRSlicerLib as that user (" + "; ".join(reasons) + ")")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

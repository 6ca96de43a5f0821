"""CBIRSlicer: similar-case search for CT and MR volumes (3D Slicer scripted module).

Thin by design: the widget wires the GUI, the logic turns MRML nodes into plain core
objects and calls ``CBIRSlicerLib``, which holds everything else and is tested outside
Slicer. Nothing heavy (torch, faiss, open_clip) is imported at file scope.
"""

from __future__ import annotations

import logging

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class CBIRSlicer(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Similar Cases (CBIR)"
        self.parent.categories = ["Informatics"]
        self.parent.dependencies = []
        self.parent.contributors = ["CBIRSlicer developers"]
        self.parent.helpText = (
            "Find the most similar cases to a volume, a slice or a region of interest in a local index, "
            "using vision foundation models (BiomedCLIP by default). "
            'See the <a href="https://github.com/cbirslicer/SlicerCBIR#readme">README</a> for the tutorial.'
        )
        self.parent.acknowledgementText = (
            "Retrieval protocol after Denner et al. 2024, 'Leveraging foundation models for content-based image "
            "retrieval in radiology', and Khun Jush et al. 2024 (slice-to-volume ranking with late interaction). "
            "Default embedding model: BiomedCLIP (Zhang et al. 2023, microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224)."
        )


class CBIRSlicerWidget(ScriptedLoadableModuleWidget):
    """The module panel. The search panel (index, query, results, side-by-side view) is not built yet."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        import qt

        from CBIRSlicerLib import __version__

        label = qt.QLabel(
            f"CBIRSlicer core {__version__}: volume reading, slicing and the 'cbir' command line are in place. "
            "The search panel is not built yet."
        )
        label.wordWrap = True
        self.layout.addWidget(label)
        self.layout.addStretch(1)


class CBIRSlicerLogic(ScriptedLoadableModuleLogic):
    """Turns MRML nodes into core objects and calls CBIRSlicerLib."""

    def volumeFromNode(self, volumeNode):
        """The core Volume of a scalar volume node (voxels and RAS geometry)."""
        from CBIRSlicerLib.mrml import volume_from_node

        return volume_from_node(volumeNode)

    def slicesOfNode(self, volumeNode, axis="axial", roi=None):
        """The model-ready images of a volume node along an axis (optionally an RoiBox), each with its RAS position."""
        from CBIRSlicerLib.slicing import extract_slices

        return extract_slices(self.volumeFromNode(volumeNode), axis, roi)


class CBIRSlicerTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a synthetic volume node gives images at the right RAS positions."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_node_geometry_reaches_the_core()

    def test_node_geometry_reaches_the_core(self):
        import numpy as np

        from CBIRSlicerLib import synthetic
        from CBIRSlicerLib.roi import RoiBox

        self.delayDisplay("Building a synthetic volume node")
        shape = (40, 36, 28)
        matrix = synthetic.centered_matrix(shape, (1.0, 1.0, 1.0), synthetic.rotation(0, 0, 90), center=(5.0, -3.0, 2.0))
        phantom = synthetic.render(matrix, shape)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom")
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
        slicer.util.updateVolumeFromArray(node, phantom.array)

        logic = CBIRSlicerLogic()
        volume = logic.volumeFromNode(node)
        self.assertTrue(np.allclose(volume.ijk_to_ras, matrix))
        blob = synthetic.default_blobs()[0]
        crops = logic.slicesOfNode(node, "axial", RoiBox(blob.center, (12.0, 12.0, 12.0)))
        self.assertEqual(len(crops), 12)
        middle = min(crops, key=lambda c: abs(c.ras[2] - blob.center[2]))
        row, col = middle.ras_to_pixel(blob.center)
        self.assertAlmostEqual(float(middle.pixels[round(row), round(col)]), blob.value, delta=30)
        logging.info("CBIRSlicer self-test passed")
        self.delayDisplay("Test passed")

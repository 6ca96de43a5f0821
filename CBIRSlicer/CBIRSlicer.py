"""CBIRSlicer: similar-case search for CT and MR volumes (3D Slicer scripted module, Slicer 5.8 and later).

Thin by design: the widget wires the GUI to a parameter node and polls background work from a
timer; the logic turns MRML nodes into plain core objects and calls ``CBIRSlicerLib``, which holds
everything else and is tested outside Slicer with ``slicer-core``. The library is imported once,
here at the top: importing it loads nothing heavy (torch, faiss and open_clip load inside the
functions that use them), and the widget's Reload reloads it too. Nothing is installed without the
user's consent, and leaving the module leaves the view layout as the user has it.
"""

# No "from __future__ import annotations": the parameter node wrapper reads the class annotations as real types.
import contextlib
import importlib
import logging
import os
import pathlib
import shutil
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CBIRSlicerLib import dependencies
from CBIRSlicerLib.imaging import readers, synthetic
from CBIRSlicerLib.index import background_build, dicom_sources, dicomweb_listing, labels
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.index.location import open_index
from CBIRSlicerLib.index.writer import BuildReport
from CBIRSlicerLib.models import registry
from CBIRSlicerLib.progress import PendingCall, State
from CBIRSlicerLib.retrieval import queries, saved_search
from CBIRSlicerLib.retrieval.answers import CaseResult, SearchAnswer
from CBIRSlicerLib.retrieval.queries import QuerySpec, parse_filters
from CBIRSlicerLib.scene import keep_results, nodes, result_volumes, search_session, thumbnails
from CBIRSlicerLib.scene import layout as views

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # outside the Slicer application (slicer-core): strings stay as written

    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text


README_URL = "https://github.com/cbirslicer/SlicerCBIR#readme"
# The panel's names of the query modes (parameter-node values), in the order of the library's one list of them.
QUERY_MODES = dict(zip(("Region (ROI)", "Segment", "Current slice", "Whole volume"), queries.VOLUME_MODES))
POLL_MS = 100
LIBRARY = "CBIRSlicerLib"


#
# Module
#

class CBIRSlicer(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Similar Cases (CBIR)")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Informatics")]
        self.parent.dependencies = []
        self.parent.contributors = ["CBIRSlicer developers"]
        self.parent.helpText = _(
            "Find the cases most similar to a region of interest, a slice or a whole volume in a local index of "
            "volumes, using vision foundation models (BiomedCLIP by default; a weight-free 'handcrafted' model works "
            "offline). Build or open an index, choose the query, click <b>Find similar</b>, then double-click a result "
            "to see it side by side with the query at its best-matching slice. "
            'See the <a href="{url}">README</a> for installation, a tutorial with sample data and how to cite.'
        ).format(url=README_URL)
        self.parent.acknowledgementText = _(
            "CBIRSlicer builds on published work on content-based image retrieval in radiology with foundation models. "
            "Please cite: "
            "Denner S, Zimmerer D, Bounias D, et al. Leveraging foundation models for content-based image retrieval in "
            "radiology. arXiv:2403.06567, 2024. "
            "Khun Jush F, Vogler S, Truong T, Lenga M. Content-based image retrieval for multi-class volumetric radiology "
            "images: a benchmark study. arXiv:2405.09334, 2024 (slice-to-volume ranking with late interaction). "
            "Khun Jush F, Vogler S, Lenga M. Content-based 3D image retrieval and a ColBERT-inspired re-ranking for tumor "
            "flagging and staging. arXiv:2507.17412, 2025 (C-MIR). "
            "Zhang S, Xu Y, Usuyama N, et al. BiomedCLIP: a multimodal biomedical foundation model pretrained from fifteen "
            "million scientific image-text pairs. arXiv:2303.00915, 2023 (default embedding model, "
            "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224)."
        )


#
# Parameter node
#

@parameterNodeWrapper
class CBIRSlicerParameterNode:
    """What the panel shows, saved with the scene."""

    indexFolder: pathlib.Path
    sourceFolder: pathlib.Path
    model: str = "biomedclip"
    queryVolume: vtkMRMLScalarVolumeNode
    queryMode: Annotated[str, Choice(list(QUERY_MODES))] = "Region (ROI)"
    roiNode: vtkMRMLMarkupsROINode
    segmentNode: vtkMRMLNode  # a segmentation or a label map volume (the selector offers only those)
    segmentName: str = ""  # the segment's name (or a label value); empty: the first
    axis: Annotated[str, Choice(["axial", "coronal", "sagittal"])] = "axial"
    queryText: str = ""
    k: Annotated[int, WithinRange(1, 100)] = 10
    filters: str = ""
    sameKindFirst: bool = True
    linkViews: bool = False


#
# Widget
#

class CBIRSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: index, query, results. Long work runs elsewhere; a timer polls it."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._build = None
        self._search = None
        self._placement = None  # matches being placed anatomically after the list is shown
        self._answer = None
        self._lastSearch = None  # the finished search the shown answer came from: 'Search again' re-runs its query
        self._marks = search_session.Feedback()  # results marked relevant / not relevant since the last new search
        self._timer = None
        self._buildSkipped = []
        self._lastQuery = None  # the query of the answer shown, for saving it
        self._savedPath = None  # the file the answer shown was saved to (or reloaded from)
        self._reloaded = None  # a saved search reloaded, until it is run again

    def setup(self) -> None:
        """Load the .ui, connect widgets, start observing the scene."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CBIRSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CBIRSlicerLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.openIndexButton.connect("clicked(bool)", self.onOpenIndex)
        self.ui.indexFolderPathLineEdit.connect("currentPathChanged(QString)", self.onIndexFolderChanged)
        self.ui.buildFromFolderButton.connect("clicked(bool)", self.onBuildFromFolder)
        self.ui.buildFromSceneButton.connect("clicked(bool)", self.onBuildFromScene)
        self.ui.cancelBuildButton.connect("clicked(bool)", self.onCancelBuild)
        self.ui.indexDicomDatabaseButton.connect("clicked(bool)", self.onIndexDicomDatabase)
        self.ui.placeRoiButton.connect("clicked(bool)", self.onPlaceRoi)
        self.ui.findSimilarButton.connect("clicked(bool)", self.onFindSimilar)
        self.ui.resultsListWidget.connect("itemDoubleClicked(QListWidgetItem*)", self.onResultActivated)
        self.ui.resultsListWidget.connect("currentRowChanged(int)", self.onResultSelected)
        self.ui.showResultButton.connect("clicked(bool)", self.onShowResult)
        self.ui.moreLikeThisButton.connect("clicked(bool)", self.onMoreLikeThis)
        self.ui.linkViewsCheckBox.connect("toggled(bool)", self.onLinkViews)
        self.ui.restoreLayoutButton.connect("clicked(bool)", self.onRestoreLayout)
        self.ui.keepFolderLineEdit.connect("textChanged(QString)", self.onKeepFolderChanged)
        self.ui.saveSearchButton.connect("clicked(bool)", self.onSaveSearch)
        self.ui.loadSearchButton.connect("clicked(bool)", self.onLoadSearch)
        self.ui.exportButton.connect("clicked(bool)", self.onExportResults)
        self.ui.labelButton.connect("clicked(bool)", self.onLabelResult)
        self.ui.relevantButton.connect("clicked(bool)", self.onMarkRelevant)
        self.ui.notRelevantButton.connect("clicked(bool)", self.onMarkNotRelevant)
        self.ui.searchAgainButton.connect("clicked(bool)", self.onSearchAgain)
        self.ui.labelsToAskButton.connect("clicked(bool)", self.onLabelsToAsk)

        self.initializeParameterNode()
        self._updateButtons()

    def cleanup(self) -> None:
        """Stop polling and observing; the logic stops its workers."""
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self) -> None:
        """Make sure a parameter node exists and is shown."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Leaving the module stops reacting to parameter changes; the layout stays as it is (Restore layout gives it back)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onReload(self) -> None:
        """Developer Reload: stop the background work, reload the library's modules, then reload this file as Slicer does."""
        self.cleanup()  # the workers are owned by the library modules about to be replaced
        reloadLibrary()
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is going away: forget its nodes, and stop a search for one of them."""
        if self._search is not None:
            self._search.cancel()  # the next tick says "Cancelled." instead of listing answers to a closed scene's query
        self.setParameterNode(None)
        self.logic.forgetScene()
        self._answer = self._placement = self._lastSearch = None
        self._marks = search_session.Feedback()
        self.ui.resultsListWidget.clear()
        self.ui.suggestionLabel.text = ""

    def onSceneEndClose(self, caller, event) -> None:
        """A new empty scene: start over with a fresh parameter node."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Bind to the module's parameter node, defaulting the query volume to the one in the Red view."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.queryVolume:
            self._parameterNode.queryVolume = self.logic.defaultQueryVolume()

    def setParameterNode(self, inputParameterNode) -> None:
        """Connect the GUI to a parameter node (and disconnect the previous one)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        session = self.logic.session is not None
        building = self._build is not None and not self._build.finished
        searching = self._search is not None
        mode = QUERY_MODES[p.queryMode]
        canQuery = bool(p.queryVolume) and (mode != "roi" or bool(p.roiNode)) and (mode != "segment" or bool(p.segmentNode))
        self.ui.findSimilarButton.enabled = session and (searching or canQuery or bool(p.queryText.strip()))
        self.ui.findSimilarButton.text = _("Cancel") if searching else _("Find similar")
        self.ui.findSimilarButton.toolTip = (_("Cancel the search") if searching else
                                             _("Search the index") if session else _("Open an index first"))
        self.ui.textQueryLineEdit.enabled = session and self.logic.supportsText()
        target = _isFolder(p.indexFolder, True) or search_session.is_server_location(str(p.indexFolder))  # or a Milvus location
        self.ui.buildFromFolderButton.enabled = not building and _isFolder(p.sourceFolder) and target
        self.ui.buildFromSceneButton.enabled = not building and target
        self.ui.indexDicomDatabaseButton.enabled = not building and target
        self.ui.cancelBuildButton.enabled = building
        selected = self._selectedResult() is not None
        self.ui.showResultButton.enabled = selected
        self.ui.moreLikeThisButton.enabled = selected and session
        self.ui.relevantButton.enabled = self.ui.notRelevantButton.enabled = selected and session
        self.ui.searchAgainButton.enabled = session and not searching and bool(self._marks) and self._lastSearch is not None
        self.ui.labelsToAskButton.enabled = session
        self.ui.restoreLayoutButton.enabled = self.logic.sideBySide is not None
        self._updateKeepButtons(session, searching, selected)

    # ----- index ---------------------------------------------------------------------------------
    def onIndexFolderChanged(self, path: str) -> None:
        """Open an index as soon as its folder is chosen."""
        session = self.logic.session
        if session is not None and search_session.same_location(path, session.index):
            return  # already open (the parameter node writes the path back on every connect)
        if search_session.is_index_folder(path):
            self._openIndex(path)  # the path given: the parameter node may not have it yet (its slot runs after this one)

    def onOpenIndex(self) -> None:
        """Open the index (installing what its model needs, with consent) and show what it holds."""
        self._openIndex(str(self._parameterNode.indexFolder))

    def _openIndex(self, folder: str) -> None:
        # The index searched is the one in the folder field, or none: not the previous one kept after a failed open.
        self.logic.closeIndex()
        self._showAnswer(None)
        self.ui.indexInfoLabel.text = _("No index open.")
        try:
            with _errorShown(_("Could not open the index.")):
                if not search_session.is_index_location(folder):
                    self.ui.indexInfoLabel.text = _("No index in {folder} yet: build one below.").format(folder=folder)
                    return
                info = self.logic.openIndex(folder)
                if info is None:
                    self.ui.indexInfoLabel.text = _("Not opened: the packages the model needs are not installed.")
                    return
                self.ui.indexInfoLabel.text = search_session.describe_index(info)
        finally:
            self._updateButtons()

    def onBuildFromFolder(self) -> None:
        """Index the volumes of a folder in the background."""
        self._startBuild([str(self._parameterNode.sourceFolder)], [])

    def onBuildFromScene(self) -> None:
        """Index the scene's volumes that are saved to files."""
        files, skipped = self.logic.sceneVolumeFiles()
        if not files:
            slicer.util.warningDisplay(_("No volume in the scene is saved to a file; save them first (File > Save Data)."))
            return
        self._startBuild(files, skipped)

    def onIndexDicomDatabase(self) -> None:
        """Index the series of Slicer's DICOM database that pass the modality and date filter (the database is only read)."""
        with _errorShown(_("Could not index the DICOM database.")):
            database = self.logic.dicomDatabaseFile()
            if not database:
                slicer.util.warningDisplay(_("Slicer has no DICOM database open; import DICOM data in the DICOM module first."))
                return
            low, high = dicomweb_listing.parse_date_range(self.ui.dicomDatesLineEdit.text.strip())
            modalities = [m.strip().upper() for m in self.ui.dicomModalityLineEdit.text.split(",") if m.strip()]
            self._startBuild([dicom_sources.CTK_PREFIX + database], [],
                             {"modalities": modalities, "date_from": low, "date_to": high})

    def _startBuild(self, sources: list[str], skipped: list[tuple[str, str]], dicom: Optional[dict] = None) -> None:
        folder = str(self._parameterNode.indexFolder)
        with _errorShown(_("Could not start indexing.")):
            model = self.logic.buildModel(folder, self._parameterNode.model.strip() or "biomedclip")
            if not self.logic.ensureDependencies(model):
                return
            self.logic.closeIndex()  # the build takes the index's write lock; reopened when it ends
            self._build = self.logic.startBuild(folder, sources, model, dicom)
            self._buildSkipped = list(skipped)
            self.ui.skippedPlainTextEdit.plainText = ""
            self.ui.buildStatusLabel.text = _("Starting...")
            self._timer.start()
        self._updateButtons()

    def onCancelBuild(self) -> None:
        """Stop the build after the case in hand."""
        if self._build is not None:
            self._build.cancel()
            self.ui.buildStatusLabel.text = _("Stopping after the current case...")

    def _pollBuild(self) -> None:
        progress = self._build.poll()
        self.ui.buildProgressBar.maximum = max(progress.total, 1)
        self.ui.buildProgressBar.value = progress.done
        if not progress.finished:
            self.ui.buildStatusLabel.text = _buildStatus(progress)
            return
        build, self._build = self._build, None
        if progress.state == State.FAILED:
            self.ui.buildStatusLabel.text = _("Indexing failed: {error}").format(error=build.error)
        else:
            report = build.report or BuildReport()
            skipped = self._buildSkipped + report.skipped
            self.ui.buildStatusLabel.text = _buildOutcome(progress.state, report, len(skipped))
            self.ui.skippedPlainTextEdit.plainText = "\n".join(f"{os.path.basename(p)}: {why}" for p, why in skipped)
        self.onOpenIndex()

    # ----- query ---------------------------------------------------------------------------------
    def onPlaceRoi(self) -> None:
        """Add an ROI centred on the query view (or the Red view) and select it."""
        with _errorShown(_("Could not place an ROI.")):
            self._parameterNode.roiNode = self.logic.placeRoi()
            self._parameterNode.queryMode = "Region (ROI)"

    def onFindSimilar(self) -> None:
        """Start a search (or cancel the running one: the button doubles as Cancel)."""
        if self._search is not None:
            self._search.cancel()
            return
        p = self._parameterNode
        with _errorShown(_("Could not search.")):
            if p.queryText.strip() and self.logic.supportsText():
                self._search = self.logic.startTextSearch(p.queryText, p.k, p.filters)
            else:
                self._search = self.logic.startSearch(p.queryVolume, QUERY_MODES[p.queryMode], p.roiNode, p.axis, p.k, p.filters,
                                                      p.segmentNode, p.segmentName, p.sameKindFirst)
            self.ui.searchStatusLabel.text = _("Searching...")
            self._marks = search_session.Feedback()
            self._timer.start()
        self._updateButtons()

    def onMoreLikeThis(self) -> None:
        """Search with the selected result's best-matching image."""
        result = self._selectedResult()
        with _errorShown(_("Could not search.")):
            self._search = self.logic.startMoreLike(result, self._parameterNode.k, self._parameterNode.filters)
            self._marks = search_session.Feedback()
            self._timer.start()
        self._updateButtons()

    def _pollSearch(self) -> None:
        progress = self._search.poll()
        self.ui.searchProgressBar.maximum = max(progress.total, 1)
        self.ui.searchProgressBar.value = progress.done
        if not progress.finished:
            self.ui.searchStatusLabel.text = (_("Loading the model (once per session)...") if progress.state == State.LOADING_MODEL
                                              else _("Embedding {done} of {total} query images...").format(done=progress.done,
                                                                                                           total=progress.total))
            return
        search, self._search = self._search, None
        if progress.state == State.DONE:
            self._lastSearch = search
            self._showAnswer(search.answer)
            self._lastQuery, self._savedPath = search.query, None
            if self._reloaded is not None:  # a reloaded search run again: what changed since it was saved
                changes = saved_search.compare(self._reloaded.answer, search.answer).brief()
                self.ui.keepStatusLabel.text = _("Since it was saved: {changes}.").format(changes=changes)
                self._reloaded = None
            # The list is shown; where each case matched is refined in the background (placement reads the volumes).
            self._placement = self.logic.startPlacement(search)
            if self._placement is not None:
                self.ui.searchStatusLabel.text = self.ui.searchStatusLabel.text + " " + _("Placing the matches...")
        else:
            self.ui.searchStatusLabel.text = (_("Cancelled.") if progress.state == State.CANCELLED
                                              else _("Search failed: {reason}").format(reason=progress.message))
        self._updateButtons()

    def onPoll(self) -> None:
        """Timer tick: advance the build and the search; stop ticking when neither runs."""
        try:
            if self._build is not None:
                self._pollBuild()
            if self._search is not None:
                self._pollSearch()
            if self._placement is not None and self._placement.poll().finished:
                self._placementDone()
        except Exception as error:  # never leave a dead timer ticking on an error
            self._build = self._search = self._placement = None
            slicer.util.errorDisplay(_("CBIRSlicer: {error}").format(error=error))
            logging.exception("CBIRSlicer background work failed")
        if self._build is None and self._search is None and self._placement is None:
            self._timer.stop()
        self._updateButtons()

    def _placementDone(self) -> None:
        placement, self._placement = self._placement, None
        if placement.answer is not None and self._answer is not None and placement.answer.query is self._answer.query:
            self._answer = placement.answer  # same cases in the same order: the list stays, the matches move
            for row, result in enumerate(self._answer.results):
                self.ui.resultsListWidget.item(row).setText(search_session.result_mark(self._marks, result) + _describeResult(result))
            self.ui.searchStatusLabel.text = self.ui.searchStatusLabel.text.replace(_("Placing the matches..."), _("Matches placed."))
        elif placement.error is not None:
            self.ui.searchStatusLabel.text = _("Matches not placed: {reason}").format(reason=placement.error)

    # ----- results -------------------------------------------------------------------------------
    def _showAnswer(self, answer: Optional[SearchAnswer]) -> None:
        self._answer = answer
        self.ui.resultsListWidget.clear()
        self.ui.suggestionLabel.text = search_session.suggestion_text(answer)
        if answer is None:
            return
        icons = self.logic.thumbnailFiles(answer)
        for result in answer.results:
            item = qt.QListWidgetItem(_describeResult(result))
            if result.case_id in icons:
                item.setIcon(qt.QIcon(icons[result.case_id]))
            item.setToolTip(result.source)
            self.ui.resultsListWidget.addItem(item)
        count = len(answer.results)
        self.ui.searchStatusLabel.text = (_("1 similar case.") if count == 1 else _("{count} similar cases.").format(count=count)
                                          if count else _("No similar cases found."))
        self.ui.searchStatusLabel.toolTip = answer.note or ""  # why fewer cases than asked for, when there are

    def _selectedResult(self) -> Optional[CaseResult]:
        row = self.ui.resultsListWidget.currentRow
        if self._answer is None or row < 0 or row >= len(self._answer.results):
            return None
        return self._answer.results[row]

    def onResultSelected(self, row: int) -> None:
        """Enable the result buttons."""
        self._updateButtons()

    def onResultActivated(self, item) -> None:
        """Double-click: show the result side by side."""
        self.onShowResult()

    def onShowResult(self) -> None:
        """Load the selected case (once) and show it next to the query at its best match."""
        result = self._selectedResult()
        if result is None:
            return
        p = self._parameterNode
        with _errorShown(_("Could not show the case.")):
            self.logic.showResult(result, p.queryVolume, self._answer.query, p.roiNode, p.linkViews)
        self._updateButtons()

    def onMarkRelevant(self) -> None:
        """Mark the selected result relevant (again: clear the mark)."""
        self._mark(True)

    def onMarkNotRelevant(self) -> None:
        """Mark the selected result not relevant (again: clear the mark)."""
        self._mark(False)

    def _mark(self, relevant: bool) -> None:
        result = self._selectedResult()
        if result is None:
            return
        same = result.case_id in (self._marks.relevant if relevant else self._marks.not_relevant)
        search_session.mark_result(self._marks, result, None if same else relevant)
        row = self.ui.resultsListWidget.currentRow
        self.ui.resultsListWidget.item(row).setText(search_session.result_mark(self._marks, result) + _describeResult(result))
        self._updateButtons()

    def onSearchAgain(self) -> None:
        """Search again with the marks (relevance feedback); the marked cases are left out of the new list."""
        with _errorShown(_("Could not search.")):
            p = self._parameterNode
            self._search = self.logic.startSearchAgain(self._lastSearch, self._marks, p.k, p.filters)
            self.ui.searchStatusLabel.text = _("Searching again with {count} marked cases...").format(count=len(self._marks.judged))
            self._timer.start()
        self._updateButtons()

    def onLabelsToAsk(self) -> None:
        """Active learning: list the unlabelled cases worth labelling next, in the status line."""
        with _errorShown(_("Could not list the cases to label.")):
            self.ui.searchStatusLabel.text = self.logic.labelsToAsk()

    def onLinkViews(self, linked: bool) -> None:
        """Link or unlink the two views while they are shown."""
        self.logic.linkViews(linked)

    def onRestoreLayout(self) -> None:
        """Go back to the layout from before the side-by-side view."""
        self.logic.restoreLayout()
        self._updateButtons()

    # ----- results a user keeps (save, reload, export, label) ------------------------------------------------------
    def _updateKeepButtons(self, session: bool, searching: bool, selected: bool) -> None:
        shown = self._answer is not None and not searching
        self.ui.saveSearchButton.enabled = shown and self._lastQuery is not None and session
        self.ui.exportButton.enabled = shown and (self._savedPath is not None or (self._lastQuery is not None and session))
        self.ui.loadSearchButton.enabled = self.ui.savedSearchesComboBox.count > 0
        self.ui.labelButton.enabled = selected and session

    def _searchesFolder(self) -> str:
        return keep_results.searches_folder(slicer.mrmlScene, self.ui.keepFolderLineEdit.text)

    def _listSavedSearches(self) -> None:
        try:
            found = keep_results.saved_searches(self._searchesFolder())
        except Exception:  # no folder yet (an unsaved scene): nothing to list
            found = []
        self.ui.savedSearchesComboBox.clear()
        for path in found:
            self.ui.savedSearchesComboBox.addItem(os.path.basename(path), path)

    def onKeepFolderChanged(self, text: str) -> None:
        """The saved-searches folder (a setting of this session's panel) changed: list the searches there."""
        self._listSavedSearches()
        self._updateButtons()

    def onSaveSearch(self) -> None:
        """Save the answer shown with its query, settings and index."""
        p = self._parameterNode
        with _errorShown(_("Could not save the search.")):
            self._savedPath = self.logic.saveSearch(self._searchesFolder(), self._lastQuery, self._answer, p.k, p.axis, p.filters,
                                                    self._placement is None, p.queryVolume)
            self.ui.keepStatusLabel.text = _("Saved to {path}").format(path=self._savedPath)
            self._listSavedSearches()
        self._updateButtons()

    def onLoadSearch(self) -> None:
        """Bring back the chosen saved search: its query volume, its ROI and its results (Find similar runs it again)."""
        path = self.ui.savedSearchesComboBox.itemData(self.ui.savedSearchesComboBox.currentIndex)
        with _errorShown(_("Could not load the saved search.")):
            reloaded = self.logic.loadSearch(path)
            p = self._parameterNode
            if reloaded.volume_node is not None:
                p.queryVolume = reloaded.volume_node
            if reloaded.roi_node is not None:
                p.roiNode = reloaded.roi_node
            p.k, p.axis = reloaded.saved.settings.k, reloaded.saved.settings.axis
            self._showAnswer(reloaded.saved.answer if self.logic.session is not None else None)
            self._lastQuery, self._savedPath, self._reloaded = None, path, reloaded.saved
            self.ui.keepStatusLabel.text = _("Loaded {name}: Find similar runs it again.").format(name=os.path.basename(path))
        self._updateButtons()

    def onExportResults(self) -> None:
        """Write the saved search's results as CSV and as a Slicer scene (.mrb) next to it (saving it first if needed)."""
        if self._savedPath is None:
            self.onSaveSearch()
        if self._savedPath is None:
            return
        with _errorShown(_("Could not export the results.")):
            written = self.logic.exportResults(self._savedPath, self._searchesFolder())
            self.ui.keepStatusLabel.text = _("Wrote {files}").format(files=", ".join(written))
        self._updateButtons()

    def onLabelResult(self) -> None:
        """Give the selected result a label (column=value): in the index, or beside the searches if it is read-only."""
        result = self._selectedResult()
        with _errorShown(_("Could not label the case.")):
            written = self.logic.labelResult(result, self.ui.labelLineEdit.text, self.ui.labelByLineEdit.text, self._searchesFolder())
            where = _("the index") if written.where == "index" else written.path
            self.ui.keepStatusLabel.text = _("{name}: {column}={value} written to {where}").format(
                name=result.title, column=written.entry.column, value=written.entry.value, where=where)
        self._updateButtons()


@contextlib.contextmanager
def _errorShown(message: str):
    """Show an error in a message box (its traceback under "Show details") and go on: slicer.util.tryWithErrorDisplay
    re-raises after showing, which would end the handler early (its buttons not updated) and print the traceback to the
    Python console as well. Under --testing nothing is shown, so the error is raised."""
    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            yield
    except Exception:
        if slicer.app.testingEnabled():
            raise


def _isFolder(path, mayBeNew: bool = False) -> bool:
    text = str(path) if path is not None else ""
    if not text or text == ".":
        return False
    return os.path.isdir(text) or (mayBeNew and os.path.isdir(os.path.dirname(os.path.abspath(text))))


def _duration(seconds: float) -> str:
    return _("{seconds} s").format(seconds=f"{seconds:.0f}") if seconds < 90 else _("{minutes} min").format(minutes=f"{seconds / 60:.0f}")


def _buildStatus(progress) -> str:
    """The status line of a running build: cases done, rate, time left, the case in hand."""
    if not progress.total:  # still listing the folder: not "0 of 0 cases: "
        return _("Looking for volumes...")
    text = _("{done} of {total} cases").format(done=progress.done, total=progress.total)
    if progress.rate:
        text += _(", {rate} cases/min").format(rate=f"{progress.rate * 60:.1f}")
    if progress.eta_s:
        text += _(", about {duration} left").format(duration=_duration(progress.eta_s))
    return f"{text}: {os.path.basename(progress.label)}" if progress.label else text


def _buildOutcome(state: State, report: BuildReport, skipped: int) -> str:
    """The status line of a finished (or cancelled) build."""
    counts = _("{added} added, {refreshed} refreshed, {unchanged} unchanged, {skipped} skipped.").format(
        added=len(report.added), refreshed=len(report.replaced), unchanged=len(report.unchanged), skipped=skipped)
    return (_("Cancelled.") if state == State.CANCELLED else _("Done.")) + " " + counts


def _describeResult(result: CaseResult) -> str:
    """A result's two lines in the list: rank, name and score; where it matched, its modality and labels."""
    best = result.best_match
    details = [d for d in (result.modality, ", ".join(result.labels)) if d]
    first = _("{rank}. {name}   score {score}").format(rank=result.rank, name=result.title, score=f"{result.score:.3f}")
    second = _("{axis} slice {index}").format(axis=best.axis, index=best.slice_index)
    if best.shown:  # once placed: the same anatomy as the query, or a look-alike elsewhere (a focal finding's box)
        second += "   " + (_("same anatomy") if best.shown == "anatomy" else _("look-alike"))
    return f"{first}\n{second}" + (f"   {'; '.join(details)}" if details else "")


#
# Logic
#

class CBIRSlicerLogic(ScriptedLoadableModuleLogic):
    """Turns MRML nodes into core objects and calls CBIRSlicerLib; holds the open index and the side-by-side state."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None
        self.sideBySide = None
        self._matchBox = None
        self._layoutLogic = None

    def getParameterNode(self):
        """The module's parameter node, typed."""
        return CBIRSlicerParameterNode(super().getParameterNode())

    def cleanup(self) -> None:
        """Close the index and stop the background model workers."""
        self.closeIndex()
        search_session.shutdown_services()

    def forgetScene(self) -> None:
        """The scene is closing: its nodes, including the side-by-side views' content, are gone."""
        self.sideBySide = None
        self._matchBox = None

    # ----- dependencies --------------------------------------------------------------------------
    @staticmethod
    def pythonExecutable() -> str:
        """PythonSlicer: the interpreter the background workers run in (Slicer's own sys.executable is the application)."""
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        found = shutil.which("PythonSlicer") or os.path.join(slicer.app.slicerHome, "bin", name)
        if not os.path.exists(found):
            raise RuntimeError(_("PythonSlicer not found (looked in PATH and {folder})").format(
                folder=os.path.join(slicer.app.slicerHome, "bin")))
        return found

    @staticmethod
    def resourcesFolder() -> str:
        """The module's Resources folder (its requirement files)."""
        return os.path.join(os.path.dirname(__file__), "Resources")

    def ensureDependencies(self, model: str) -> bool:
        """Install what a model needs, after asking once (:func:`CBIRSlicerLib.dependencies.ensure`, with Slicer's dialogs)."""
        try:
            import PyTorchUtils

            torch = PyTorchUtils.PyTorchUtilsLogic()
        except ModuleNotFoundError:
            torch = None

        def pipInstall(packages: list) -> None:
            with slicer.util.WaitCursor():
                slicer.util.pip_install(packages)

        host = dependencies.Host(slicer.util.errorDisplay,
                                 lambda text, title: slicer.util.confirmOkCancelDisplay(text, windowTitle=title),
                                 pipInstall, torch, slicerPackaging(), slicer.app.testingEnabled(), _)
        return dependencies.ensure(self.resourcesFolder(), model, host)

    @staticmethod
    def supportsTextModel(model: str) -> bool:
        """Whether a model name stands for a CLIP-family model (it embeds phrases too)."""
        try:
            return registry.parse_model_name(model)[0] == "open_clip"
        except Exception:
            return False

    def supportsText(self) -> bool:
        """Whether the open index's model embeds phrases."""
        return self.session is not None and self.supportsTextModel(self.session.model)

    # ----- index ---------------------------------------------------------------------------------
    def openIndex(self, folder: str) -> Optional[dict]:
        """Open an index for searching, once: installs what its model needs (asking first), then starts the model loading
        in the background; returns its info, or None when the packages its model needs are not there."""
        self.closeIndex()
        index = open_index(str(folder))
        try:
            if not self.ensureDependencies(index.model_name()):
                index.close()
                return None
            self.session = search_session.SearchSession(index, python=self.pythonExecutable())
        except BaseException:
            index.close()
            raise
        return self.session.info()

    def closeIndex(self) -> None:
        """Close the open index, if any."""
        if self.session is not None:
            self.session.close()
            self.session = None

    @staticmethod
    def buildModel(folder: str, requested: str) -> str:
        """The model a build will use: the index's own when it exists, else the one asked for."""
        return search_session.existing_model(folder) or requested

    def startBuild(self, folder: str, sources: list[str], model: str = "biomedclip", dicom: Optional[dict] = None):
        """Build or extend an index in a background process; poll the returned IndexBuild."""
        spec = background_build.BuildSpec(folder, list(sources), model=model, dicom=dict(dicom or {}))
        return background_build.IndexBuild(spec, python=self.pythonExecutable()).start()

    @staticmethod
    def sceneVolumeFiles() -> tuple[list[str], list[tuple[str, str]]]:
        """Files behind the scene's volumes, and the volumes that have none."""
        return nodes.volume_files_in_scene(slicer.mrmlScene)

    # ----- search --------------------------------------------------------------------------------
    def _requireSession(self):
        if self.session is None:
            raise RuntimeError(_("Open an index first."))
        return self.session

    def startSearch(self, volumeNode, mode: str = "roi", roiNode=None, axis: str = "axial", k: int = 10, filters: str = "",
                    segmentNode=None, segment: str = "", sameKindFirst: bool = True):
        """Start a search from scene nodes ('roi', 'segment', 'slice' = what the view shows, 'volume'); poll the returned
        PendingSearch. ``sameKindFirst``: cases of the query's modality and body region first (the prior; off: similarity)."""
        session = self._requireSession()
        sliceRas = None
        if mode == "slice":
            axis, sliceRas = views.view_position(self._querySliceNode())
        query = search_session.query_from_nodes(session.index, volumeNode, axis, mode, roi_node=roiNode, slice_ras=sliceRas,
                                                segment_node=segmentNode, segment=segment.strip() or None)
        return session.start(query, k, _filters(filters), prior=sameKindFirst)

    def labelsToAsk(self, count: int = 5) -> str:
        """The cases worth labelling next (active learning), as the status line says them."""
        return search_session.labels_to_ask_text(self._requireSession(), count)

    def startPlacement(self, search):
        """Place a finished search's matches anatomically in the background; poll ``finished`` (None: nothing to place)."""
        return self._requireSession().start_placement(search)

    def startTextSearch(self, text: str, k: int = 10, filters: str = ""):
        """Start a search for a phrase (CLIP-family models)."""
        return self._requireSession().start_text(text, k, _filters(filters))

    def startMoreLike(self, result: CaseResult, k: int = 10, filters: str = ""):
        """'More like this' from a result's best-matching item."""
        return self._requireSession().more_like(result.best_match.item_id, k, _filters(filters))

    def startSearchAgain(self, search, marks, k: int = 10, filters: str = ""):
        """Relevance feedback: the finished search's query again with the marked results (answered at once)."""
        return self._requireSession().search_again(search, marks, k, _filters(filters))

    def thumbnailFiles(self, answer: SearchAnswer) -> dict:
        """PNG thumbnails of the results (from the index, no volume loaded), by case id."""
        folder = os.path.join(slicer.app.temporaryPath, "CBIRSlicer", "thumbnails")
        return thumbnails.write_result_thumbnails(self._requireSession().index.catalog, answer, folder)

    # ----- views ---------------------------------------------------------------------------------
    def layoutNode(self):
        """The scene's layout node (made through a layout logic when there is no main window, e.g. under --no-main-window)."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            return layoutManager.layoutLogic().GetLayoutNode()
        if self._layoutLogic is None or self._layoutLogic.GetMRMLScene() is not slicer.mrmlScene:
            self._layoutLogic = slicer.vtkMRMLLayoutLogic()
            self._layoutLogic.SetMRMLApplicationLogic(slicer.app.applicationLogic())
            self._layoutLogic.SetMRMLScene(slicer.mrmlScene)
        return self._layoutLogic.GetLayoutNode()

    def _querySliceNode(self):
        if self.sideBySide is not None and self.layoutNode().GetViewArrangement() == self.sideBySide.layout_id:
            node = views.slice_node(slicer.mrmlScene, views.QUERY_VIEW)
            if node is not None:
                return node
        return views.slice_node(slicer.mrmlScene, "Red")

    def defaultQueryVolume(self):
        """The volume shown in the Red view, else the first scalar volume of the scene."""
        volumeId = views.composite_node(slicer.mrmlScene, "Red").GetBackgroundVolumeID() if views.slice_node(
            slicer.mrmlScene, "Red") is not None else None
        node = slicer.mrmlScene.GetNodeByID(volumeId) if volumeId else None
        return node or slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def placeRoi(self):
        """A new ROI centred on what the query (or Red) view shows."""
        sliceNode = self._querySliceNode()
        if sliceNode is None:
            raise RuntimeError(_("There is no slice view to place the ROI in."))
        return views.roi_in_view(slicer.mrmlScene, sliceNode)

    def loadVolume(self, path: str, name: str, caseId: Optional[str] = None):
        """Load a result case: Slicer's reader for files; the core DICOM reader for an indexed series folder."""
        if os.path.isdir(path):
            case = self.session.index.catalog.case_by_id(caseId) if self.session is not None and caseId else None
            return nodes.node_from_volume(slicer.mrmlScene, readers.read_volume(path, case.series_uid if case else None), name)
        return slicer.util.loadVolume(path, {"name": name, "show": False})

    def resultVolume(self, case):
        """The volume node of an indexed case (a CaseResult or a catalog CaseRecord): reused when in the scene, else loaded."""
        return result_volumes.result_volume_node(slicer.mrmlScene, case, lambda path, name: self.loadVolume(path, name, case.case_id),
                                                 self.localSeries, self.loadSeries)

    @staticmethod
    def dicomDatabaseFile() -> str:
        """The file of Slicer's DICOM database (ctkDICOM.sql), or '' when none is open."""
        database = getattr(slicer, "dicomDatabase", None)
        return database.databaseFilename if database is not None and database.isOpen else ""

    @staticmethod
    def localSeries(case):
        """A DICOM database's series, or a PACS's fetched into the local cache on first open (progress, cancel).

        The fetch runs on a background thread (network and file writing release the GIL); the modal progress dialog
        waits for it in Qt's own event loop, updated from a timer, so nothing here spins the event loop by hand."""
        fetch = PendingCall(lambda call: dicom_sources.local_series(case.source, case.series_uid, getattr(case, "study_uid", None),
                                                                    progress=call.report, should_stop=call.stopping),
                            name="cbir-fetch")
        dialog = qt.QProgressDialog(_("Fetching {name}...").format(name=case.name or case.case_id), _("Cancel"), 0, 0)
        dialog.setWindowModality(qt.Qt.WindowModal)
        dialog.minimumDuration = 500
        timer = qt.QTimer()
        timer.setInterval(POLL_MS)

        def update() -> None:
            progress = fetch.poll()
            dialog.maximum, dialog.value = progress.total, progress.done
            if progress.finished:
                dialog.accept()

        timer.connect("timeout()", update)
        dialog.connect("canceled()", fetch.cancel)
        timer.start()
        try:
            if not fetch.finished:
                dialog.exec_()
            fetch.wait()
        finally:
            timer.stop()
            dialog.close()
        return fetch.result()

    @staticmethod
    def loadSeries(series, name: str):
        """Through Slicer's DICOM module by series UID (so it shows in the DICOM browser); the library's reader otherwise.

        Not run by the tests (slicer-core has no DICOM module): the real-Slicer workflow exercises it."""
        try:
            from DICOMLib import DICOMUtils
        except ImportError:
            DICOMUtils = None
        database = getattr(slicer, "dicomDatabase", None)
        if DICOMUtils is not None and database is not None and database.isOpen:
            if not database.filesForSeries(series.series_uid):  # fetched from a PACS: add the cached files (not copied)
                DICOMUtils.importDicom(os.path.dirname(series.files[0]), database)
            loaded = DICOMUtils.loadSeriesByUID([series.series_uid])
            node = slicer.mrmlScene.GetNodeByID(loaded[0]) if loaded else None
            if node is not None:
                node.SetName(name)
                return node
        return result_volumes.read_series_node(slicer.mrmlScene, series, name)

    def showResult(self, result: CaseResult, queryVolume, query: QuerySpec, roiNode=None, link: bool = False):
        """Load the result (once), switch to the side-by-side layout, and put both views at the matching places."""
        resultNode = self.resultVolume(result)
        views.apply_window(resultNode, search_session.case_window(self._requireSession().index, result.case_id))  # as the model saw it
        self.sideBySide = views.show_side_by_side(slicer.mrmlScene, self.layoutNode(), self._queryTarget(query, queryVolume, roiNode),
                                                  views.result_target(result.best_match, resultNode), link, self.sideBySide)
        self._matchBox = views.show_match_box(slicer.mrmlScene, result.best_match, self._matchBox)
        return resultNode

    def _queryTarget(self, query: QuerySpec, queryVolume, roiNode):
        """Where the query view looks: the ROI centre or the query slice; for 'more like this', the case it started from."""
        if query.mode == "item":
            session = self._requireSession()
            item = session.index.catalog.items([query.item])[query.item]
            node = self.resultVolume(session.index.catalog.case_by_id(query.case_id))
            return views.query_target(node, item.axis, item.ras)
        if query.mode == "text" or queryVolume is None:
            return None  # nothing to show on the left: it keeps what it shows
        if query.roi is not None:
            position = [round(v, 3) for v in query.roi.center]
        elif query.point is not None:
            position = [round(v, 3) for v in query.point]
        elif roiNode is not None and query.mode == "roi":
            position = nodes.roi_from_node(roiNode).center
        else:
            position = nodes.volume_from_node(queryVolume).center_ras
        return views.query_target(queryVolume, query.axis or "axial", position)

    def linkViews(self, linked: bool) -> None:
        """Link or unlink the side-by-side views."""
        if self.sideBySide is not None:
            views.link_views(slicer.mrmlScene, linked)

    def restoreLayout(self) -> None:
        """Give back the layout from before the side-by-side view (if it is still showing)."""
        if self.sideBySide is not None:
            views.restore_layout(self.layoutNode(), self.sideBySide)
            self.sideBySide = None

    # ----- results a user keeps ------------------------------------------------------------------------------------
    def saveSearch(self, folder: str, query, answer: SearchAnswer, k: int, axis: str, filters: str, placed: bool, volumeNode=None) -> str:
        """Save a search made in the panel (query, settings, index, answer) into the searches folder; returns the file."""
        session = self._requireSession()
        settings = saved_search.SearchSettings(session.model, session.index.manifest["model"]["digest"], k, axis, "maxsim",
                                               True, _filters(filters), placed and query.volume is not None)
        marks = answer.query.feedback or search_session.Feedback()  # the marks a 'Search again' used
        return keep_results.save_search(folder, session.index, query, answer, settings, volumeNode, marks,
                                          answer.to_json().get("suggestion"))

    def loadSearch(self, path: str):
        """A saved search brought back into the scene (query volume loaded once, ROI made)."""
        return keep_results.reload_search(path, slicer.mrmlScene, lambda file, name: self.loadVolume(file, name))

    def exportResults(self, path: str, folder: str) -> list:
        """CSV and Slicer scene (.mrb) of a saved search, next to it; returns the files written."""
        saved = saved_search.SavedSearch.load(path)
        stem = os.path.splitext(path)[0]
        return [keep_results.export_csv(saved, stem + ".csv", folder), keep_results.export_scene(saved, stem + ".mrb").path]

    def labelResult(self, result: CaseResult, assignment: str, by: str, folder: str):
        """Label a result's case (COLUMN=VALUE): through the index's writer lock, or in the side file of a read-only index."""
        column, value = labels.parse_assignment(assignment)
        return keep_results.label_result(self._requireSession().index.folder, result.case_id, column, value, folder, by or None)


def _filters(text: str) -> dict:
    return parse_filters([part for part in (text or "").split(",") if part.strip()])


def slicerPackaging():
    """Slicer's package helpers (``load_requirements``, ``pip_ensure``): ``slicer.packaging``, named ``slicer.pydeps``
    in some 5.11 previews; None on older Slicer, which gets the confirm-then-pip_install fallback."""
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure") and hasattr(module, "load_requirements"):
            return module
    return None


def reloadLibrary() -> list[str]:
    """Reload every loaded module of the library, so Slicer's Reload picks up edits to it too; returns their names.

    All are dropped from ``sys.modules`` (deepest first) and imported afresh, each importing what it needs first,
    so no module keeps a name bound from an old copy of another; the module file, re-run by Slicer after this,
    binds the new ones.
    """
    loaded = sorted((name for name in sys.modules if name == LIBRARY or name.startswith(LIBRARY + ".")),
                    key=lambda name: (-name.count("."), name))
    for name in loaded:
        del sys.modules[name]
    for name in sorted(loaded):
        importlib.import_module(name)
    return sorted(loaded)


#
# Test
#

class CBIRSlicerTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test, written against the Slicer 5.8 API (also run on newer releases).

    Builds a tiny index of synthetic phantoms (two balls, two shells) with the weight-free 'handcrafted'
    model, queries it through the logic with a new ball phantom and an ROI on its lesion, and checks
    that a ball case comes first, that the side-by-side layout shows it at its best-matching slice,
    and that an unsaved copy of an indexed case does not find itself.
    Needs faiss-cpu in Slicer's Python (the CI workflow installs it before running the test).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_node_geometry_reaches_the_core()
        self.setUp()
        self.test_find_similar_and_show_side_by_side()

    def test_node_geometry_reaches_the_core(self):
        import numpy as np

        self.delayDisplay("Volume node under a transform reaches the core in world coordinates")
        shape = (40, 36, 28)
        matrix = synthetic.centered_matrix(shape, (1.0, 1.0, 1.0), synthetic.rotation(0, 0, 90), center=(5.0, -3.0, 2.0))
        node = nodes.node_from_volume(slicer.mrmlScene, synthetic.render(matrix, shape), "phantom")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        shift = np.eye(4)
        shift[:3, 3] = (10.0, 0.0, -4.0)
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
        node.SetAndObserveTransformNodeID(transform.GetID())
        volume = nodes.volume_from_node(node)
        self.assertTrue(np.allclose(volume.ijk_to_ras, shift @ matrix))
        self.delayDisplay("Test passed")

    def test_find_similar_and_show_side_by_side(self):
        import tempfile

        try:
            import faiss  # noqa: F401
        except ImportError:
            self.fail("faiss-cpu is not installed in this Slicer's Python; install it (pip_install('faiss-cpu')) first")

        self.delayDisplay("Building a tiny index of synthetic cases with the handcrafted model")
        work = tempfile.mkdtemp(prefix="CBIRSlicerTest-")
        shape = (32, 32, 16)
        blobs = [((-8.0, 6.0, 2.0), "ball"), ((7.0, -5.0, -4.0), "shell"), ((6.0, 7.0, 4.0), "ball"), ((-6.0, -7.0, 0.0), "shell")]
        paths = []
        for n, (center, kind) in enumerate(blobs):
            blob = synthetic.Blob(center, 6.0, 300.0 if kind == "ball" else 250.0, kind, 2.0)
            volume = synthetic.render(synthetic.centered_matrix(shape, (1.5, 1.5, 2.0)), shape, blobs=[blob], body_radii=(22, 21, 30))
            paths.append(synthetic.write_volume(volume, os.path.join(work, f"case{n}_{kind}.nii.gz")))
        folder = os.path.join(work, "index")
        embedder = registry.create_embedder("handcrafted")
        with Index.create(folder, embedder, IndexSettings(axes=["axial"], stride_mm=4.0, tile_sizes_mm=[20.0])) as index:
            self.assertEqual(len(index.add_sources(paths, embedder).added), len(paths))

        logic = CBIRSlicerLogic()
        try:
            info = logic.openIndex(folder)
            self.assertEqual(info["counts"]["cases"], len(paths))

            self.delayDisplay("Querying a new ball phantom (not in the index) with an ROI on its lesion")
            queryCenter = (5.0, -6.0, 2.0)
            queryBlob = synthetic.Blob(queryCenter, 6.0, 300.0, "ball", 2.0)
            queryVolume = synthetic.render(synthetic.centered_matrix(shape, (1.5, 1.5, 2.0)), shape, blobs=[queryBlob],
                                           body_radii=(22, 21, 30))
            queryNode = nodes.node_from_volume(slicer.mrmlScene, queryVolume, "query")
            roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion")
            roi.SetCenter(*queryCenter)
            roi.SetSize(20.0, 20.0, 12.0)
            answer = logic.startSearch(queryNode, "roi", roi, "axial", k=3).wait(timeout=120)
            first = answer.results[0]
            balls = {os.path.abspath(paths[n]): blobs[n][0] for n in (0, 2)}
            self.assertIn(first.source, balls)  # a case holding a ball comes first
            matched = balls[first.source]

            self.delayDisplay("Showing the first result side by side")
            resultNode = logic.showResult(first, queryNode, answer.query, roi)
            again = logic.showResult(first, queryNode, answer.query, roi)
            self.assertEqual(again.GetID(), resultNode.GetID())  # loaded once, reused after
            layoutNode = logic.layoutNode()
            self.assertEqual(layoutNode.GetViewArrangement(), views.LAYOUT_ID)
            resultView = views.slice_node(slicer.mrmlScene, views.RESULT_VIEW)
            self.assertEqual(resultView.GetOrientation(), "Axial")
            self.assertAlmostEqual(resultView.GetSliceOffset(), first.best_match.ras[2], places=3)
            self.assertLessEqual(abs(resultView.GetSliceOffset() - matched[2]), 6.0)
            composite = views.composite_node(slicer.mrmlScene, views.RESULT_VIEW)
            self.assertEqual(composite.GetBackgroundVolumeID(), resultNode.GetID())
            self.assertAlmostEqual(views.slice_node(slicer.mrmlScene, views.QUERY_VIEW).GetSliceOffset(), queryCenter[2], places=3)

            self.delayDisplay("An unsaved copy of an indexed case does not find itself")
            copyNode = nodes.node_from_volume(slicer.mrmlScene, readers.read_volume(paths[2]), "copy of case 2")
            roi.SetCenter(*blobs[2][0])
            answer = logic.startSearch(copyNode, "roi", roi, "axial", k=3).wait(timeout=120)
            self.assertNotIn(os.path.abspath(paths[2]), [r.source for r in answer.results])

            logic.restoreLayout()
            self.assertNotEqual(layoutNode.GetViewArrangement(), views.LAYOUT_ID)
        finally:
            logic.cleanup()
            shutil.rmtree(work, ignore_errors=True)
        self.delayDisplay("Test passed")

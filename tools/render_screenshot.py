"""Render the side-by-side result with Slicer's own slice rendering (slicer-core, offscreen) into Resources/Screenshot.png.

Not a mock-up: the module's logic runs on real MRML nodes (index built with the weight-free ``handcrafted``
model from a synthetic CT-like cohort, a query ROI on a new case, search through the background worker,
result loaded with Slicer's volume reader, side-by-side layout, views placed at the best match), and each
of the two views is drawn by ``vtkMRMLSliceLogic`` (reslice, window/level, blend) with Slicer's markups
displayable manager drawing the ROIs, in an offscreen VTK window (EGL or OSMesa). What the Slicer
application adds around the views (view controller bars, module panel) is not drawn.

The query is a new synthetic case (not in the index) with one lesion; the weight-free model is weak on
regions (docs/benchmarks.md), so candidate queries are tried in a fixed order and the first whose rank-1
case holds a lesion of the same kind is shown; the script prints how many candidates it tried.

    python tools/render_screenshot.py [--out Resources/Screenshot.png] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

VIEW_PX = 480
GAP_PX = 4  # the gap Slicer leaves between views
COHORT_CASES = 10
QUERY_SEED = 20260
CANDIDATES = 12
ROI_SIDE_MM = 32.0  # the indexed tile size: an ROI query is compared with tiles
# 75 % tile overlap: the setting docs/benchmarks.md measured to retrieve and localise lesions best (4x the storage).
SETTINGS = {"tile_overlap": 0.75}


def _scene():
    import slicer

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    colors.SetMRMLScene(scene)
    app.SetModuleLogic("Colors", colors)
    markups = slicer.vtkSlicerMarkupsLogic()
    markups.SetMRMLApplicationLogic(app)
    markups.SetMRMLScene(scene)
    app.SetModuleLogic("Markups", markups)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(app)
    volumes.SetMRMLScene(scene)
    layout = slicer.vtkMRMLLayoutLogic()
    layout.SetMRMLApplicationLogic(app)
    layout.SetMRMLScene(scene)
    return scene, app, volumes, layout, (colors, markups)


def render_view(scene, app, slice_node, size: int = VIEW_PX) -> np.ndarray:
    """RGB (rows, cols, 3) of one slice view as Slicer draws it: slice logic image plus markups, offscreen."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    slice_node.SetDimensions(size, size, 1)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(app)
    logic.SetMRMLScene(scene)
    logic.SetSliceNode(slice_node)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    mapper = vtk.vtkImageMapper()  # what Slicer's slice view does with the slice logic's blended RGBA image
    mapper.SetInputConnection(logic.GetImageDataConnection())
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    renderer.AddViewProp(actor)
    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app)
    if not factory.IsDisplayableManagerRegistered("vtkMRMLMarkupsDisplayableManager"):
        factory.RegisterDisplayableManager("vtkMRMLMarkupsDisplayableManager")
    group = factory.InstantiateDisplayableManagers(renderer)
    group.SetMRMLDisplayableNode(slice_node)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    image = grab.GetOutput()
    cols, rows, _ = image.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, cols, -1)[::-1, :, :3]
    render_view.keep_alive.append((logic, window, renderer, interactor, group))  # VTK tears these down badly at exit
    return np.ascontiguousarray(rgb)


render_view.keep_alive = []


def main(argv=None) -> int:
    """Build the cohort and index, search, show side by side, render both views, write the PNG; print what it shows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the cohort and index (reused when it holds them)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "Resources", "Screenshot.png"))
    args = parser.parse_args(argv)

    from CBIRSlicerLib.imaging import synthetic
    from CBIRSlicerLib.imaging.intensity import choose_window
    from CBIRSlicerLib.imaging.png import write_png
    from CBIRSlicerLib.imaging.roi import RoiBox
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.models.registry import create_embedder
    from CBIRSlicerLib.retrieval.queries import roi_query
    from CBIRSlicerLib.retrieval.search import Searcher
    from CBIRSlicerLib.scene import layout as views
    from CBIRSlicerLib.scene.nodes import volume_from_node
    from CBIRSlicerLib.scene.result_volumes import result_volume_node
    from CBIRSlicerLib.scene.search_session import SearchSession, case_window, query_from_nodes, shutdown_services

    work = args.work or tempfile.mkdtemp(prefix="cbir-screenshot-")
    cohort_dir, index_dir = os.path.join(work, "cohort"), os.path.join(work, "index")
    if not os.path.exists(os.path.join(index_dir, "manifest.json")):
        paths = synthetic.write_cohort(synthetic.make_cohort(COHORT_CASES, seed=7, kinds=synthetic.LESION_KINDS), cohort_dir)
        embedder = create_embedder("handcrafted")
        with Index.create(index_dir, embedder, IndexSettings(**SETTINGS)) as index:
            index.add_sources(paths, embedder)
    truth = synthetic.read_cohort(os.path.join(cohort_dir, synthetic.COHORT_CSV))

    # Candidate queries in a fixed order; the first whose rank-1 case holds a lesion of the same kind, with the best
    # match on that lesion, is shown.
    def on_lesion(result, kind) -> bool:
        ras = np.array(result.best_match.focus_ras)  # as the evaluation judges it: the focus inside the lesion
        return any(x.kind == kind and np.linalg.norm(ras - x.center) <= x.radius_mm for x in truth[result.name])

    searcher = Searcher(Index.open(index_dir), create_embedder("handcrafted"))
    tried = []
    for n in range(CANDIDATES):
        kind = synthetic.LESION_KINDS[n % len(synthetic.LESION_KINDS)]
        query_case = synthetic.make_case(f"new_patient_{n}", QUERY_SEED + n, (kind,))
        lesion = query_case.lesions[0]
        roi_box = RoiBox(lesion.center, (ROI_SIDE_MM,) * 3)
        ranked = searcher.search(roi_query(query_case.volume, roi_box, "axial", searcher.index), k=1).results
        tried.append((kind, [x.kind for x in truth[ranked[0].name]], on_lesion(ranked[0], kind)))
        if tried[-1][2]:
            break
    hits = sum(kind in found for kind, found, _ in tried)
    located = sum(on for _, _, on in tried)
    query_path = synthetic.write_volume(query_case.volume, os.path.join(work, f"{query_case.name}.nii.gz"))

    scene, app, volumes, layout, _keep = _scene()
    query_node = volumes.AddArchetypeVolume(query_path, query_case.name)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "query")
    roi.CreateDefaultDisplayNodes()
    roi.SetCenter(*lesion.center)
    roi.SetSize(ROI_SIDE_MM, ROI_SIDE_MM, ROI_SIDE_MM)
    roi.GetDisplayNode().SetFillOpacity(0.0)  # outline only, so the lesion inside stays visible

    session = SearchSession(index_dir, python=sys.executable)
    answer = session.start(query_from_nodes(session.index, query_node, "axial", "roi", roi_node=roi), k=5).wait(timeout=120)
    first = answer.results[0]
    result_node = result_volume_node(scene, first, lambda path, name: volumes.AddArchetypeVolume(path, name))
    layout_node = layout.GetLayoutNode()
    views.show_side_by_side(scene, layout_node, views.query_target(query_node, "axial", lesion.center),
                            views.result_target(first.best_match, result_node))
    views.show_match_box(scene, first.best_match)
    # Both volumes in the window the index cuts images with (what the module does for results; a user would pick
    # the same CT preset for the query).
    views.apply_window(result_node, case_window(session.index, first.case_id))
    views.apply_window(query_node, choose_window(volume_from_node(query_node), session.index.settings.window).as_dict())
    for name in (views.QUERY_VIEW, views.RESULT_VIEW):  # fit again now the views have their final pixel size
        views.slice_node(scene, name).SetDimensions(VIEW_PX, VIEW_PX, 1)
    views.show_side_by_side(scene, layout_node, views.query_target(query_node, "axial", lesion.center),
                            views.result_target(first.best_match, result_node))

    left = render_view(scene, app, views.slice_node(scene, views.QUERY_VIEW))
    right = render_view(scene, app, views.slice_node(scene, views.RESULT_VIEW))
    picture = np.full((VIEW_PX, 2 * VIEW_PX + GAP_PX, 3), 96, np.uint8)
    picture[:, :VIEW_PX] = left
    picture[:, VIEW_PX + GAP_PX:] = right
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_png(picture, args.out)

    best = first.best_match
    found = truth[first.name]
    print(f"wrote {args.out}")
    print(f"left: query view (axial) of a new synthetic CT case, slice through its {lesion.kind} lesion at RAS "
          f"{tuple(round(v, 1) for v in lesion.center)}, inside the query ROI ({ROI_SIDE_MM:.0f} mm box)")
    print(f"right: rank-1 result '{first.name}' (score {first.score:.3f}; its lesion: "
          f"{', '.join(f'{x.kind} at {tuple(round(v, 1) for v in x.center)}' for x in found)}), "
          f"{best.axis} slice {best.slice_index} at S = {best.ras[2]:.1f} mm, best-matching {best.kind} outlined")
    print(f"query chosen: candidate {len(tried)} of {len(tried)} tried; rank 1 had the same kind for {hits} and the best "
          f"match on that lesion for {located} (" + ", ".join(f"{kind}->{'/'.join(found)}{'*' if on else ''}"
                                                             for kind, found, on in tried) + "; * = on the lesion)")
    print("ranking: " + "; ".join(f"{r.rank}. {r.name} ({', '.join(x.kind for x in truth[r.name])}) {r.score:.3f}"
                                  for r in answer.results))
    session.close()
    shutdown_services()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: destroying VTK render windows after their context is gone crashes


if __name__ == "__main__":
    main()

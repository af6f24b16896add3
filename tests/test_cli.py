"""End-to-end tests of the ``skpatchcore`` command line on a generated MVTec-layout folder."""

import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from skpatchcore import EfficientNetLite0Extractor, PatchCoreDetector, TorchvisionExtractor
from skpatchcore.cli import (
    _build_parser,
    _make_detector,
    _make_extractor,
    _training_subset,
    find_categories,
    format_results,
    main,
)
from skpatchcore.presets import PRESETS
from skpatchcore.datasets import make_anomaly_images

CATEGORIES = ("fabric", "metal_cloth")
N_GOOD_TEST, N_DEFECT_TEST = 3, 4
# A random-weight ResNet-18 on 64 px images: fast, and enough for these textures.
TINY_RESNET = ["--backbone", "resnet18", "--weights", "none", "--image-size", "64"]
TINY_RESNET += ["--load-size", "64"]


def _write_category(base, seed):
    X_train, _, _ = make_anomaly_images(10, image_size=64, anomaly_ratio=0, random_state=seed)
    X_good, _, _ = make_anomaly_images(
        N_GOOD_TEST, image_size=64, anomaly_ratio=0, random_state=seed + 1
    )
    X_bad, _, masks = make_anomaly_images(
        N_DEFECT_TEST, image_size=64, anomaly_ratio=1, random_state=seed + 2
    )
    for folder, images in (("train/good", X_train), ("test/good", X_good), ("test/scratch", X_bad)):
        (base / folder).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(base / folder / f"{i:03d}.png")
    (base / "ground_truth" / "scratch").mkdir(parents=True)
    for i, mask in enumerate(masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            base / "ground_truth" / "scratch" / f"{i:03d}_mask.png"
        )


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    for seed, category in enumerate(CATEGORIES):
        _write_category(root / category, seed=10 * seed)
    return root


@pytest.fixture(scope="module")
def benchmark_run(mvtec_root, tmp_path_factory):
    """Run the benchmark once (random-weight ResNet-18, 64 px) for the tests below."""
    output = tmp_path_factory.mktemp("results")
    argv = ["benchmark", "--root", str(mvtec_root), "--output", str(output), "--category"]
    argv += [*CATEGORIES, *TINY_RESNET, "--heatmaps"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(argv)
    return status, stdout.getvalue(), output


def _table(stdout, title):
    """Rows (lists of cells) of the Markdown table under ``### title``."""
    lines = stdout.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_benchmark_succeeds(benchmark_run):
    status, _, _ = benchmark_run
    assert status == 0


@pytest.mark.parametrize(
    "title", ["Image-Level AUC", "Pixel-Level AUC", "Image F1 Score", "Pixel-Level AUPRO"]
)
def test_benchmark_prints_a_metric_table_per_block(benchmark_run, title):
    _, stdout, _ = benchmark_run
    header, rule, *rows = _table(stdout, title)
    assert header == ["", "Avg", "Fabric", "Metal Cloth"]
    assert rule[1] == ":---:"
    assert [row[0] for row in rows] == ["ResNet-18"]
    avg, *per_category = map(float, rows[0][1:])
    assert all(0 <= value <= 1 for value in per_category)
    assert avg == pytest.approx(np.mean(per_category), abs=1e-3)


@pytest.mark.parametrize(
    "title", ["Fit Time (s)", "Predict Time per Image (ms)", "Peak Memory (MiB)"]
)
def test_benchmark_prints_resource_tables(benchmark_run, title):
    _, stdout, _ = benchmark_run
    _, _, row = _table(stdout, title)
    assert row[0] == "ResNet-18"
    assert all(float(value) >= 0 for value in row[1:])


def test_benchmark_finds_the_synthetic_defects(benchmark_run):
    # Even random-weight features separate these synthetic defects.
    _, _, output = benchmark_run
    results = json.loads((output / "results.json").read_text())["results"]
    assert min(r["image_auroc"] for r in results) >= 0.8
    assert min(r["pixel_auroc"] for r in results) >= 0.8


def test_benchmark_writes_csv_and_json_with_the_same_results(benchmark_run):
    _, _, output = benchmark_run
    with open(output / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    document = json.loads((output / "results.json").read_text())
    assert [(r["backbone"], r["category"]) for r in rows] == [("resnet18", c) for c in CATEGORIES]
    for row, result in zip(rows, document["results"], strict=True):
        assert int(row["n_train"]) == result["n_train"] == 10
        assert int(row["n_test"]) == result["n_test"] == N_GOOD_TEST + N_DEFECT_TEST
        for key in ("image_auroc", "pixel_auroc", "image_f1", "aupro", "fit_time_s"):
            assert float(row[key]) == pytest.approx(result[key])
    assert document["settings"]["weights"] == "none"
    assert document["settings"]["image_size"] == 64
    assert document["averages"]["resnet18"]["aupro"] == pytest.approx(
        np.mean([r["aupro"] for r in document["results"]])
    )


def test_benchmark_writes_a_heatmap_per_test_image(benchmark_run):
    _, _, output = benchmark_run
    for category in CATEGORIES:
        folder = output / "heatmaps" / "resnet18" / category
        names = sorted(p.name for p in folder.iterdir())
        assert names == [f"good_{i:03d}.png" for i in range(N_GOOD_TEST)] + [
            f"scratch_{i:03d}.png" for i in range(N_DEFECT_TEST)
        ]
        with Image.open(folder / "scratch_000.png") as panel:
            # AnomalyMapDisplay's figure: one 3x3-inch image cell plus a colour bar, at 80 dpi.
            assert panel.size == (320, 240)


def test_n_train_limits_the_training_images(mvtec_root, tmp_path, capsys):
    argv = ["benchmark", "--root", str(mvtec_root), "--output", str(tmp_path)]
    status = main([*argv, "--category", "fabric", *TINY_RESNET, "--n-train", "4"])
    assert status == 0
    result = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert result["n_train"] == 4
    assert "### Image-Level AUC" in capsys.readouterr().out


def test_missing_category_fails_with_the_path(mvtec_root, capsys):
    status = main(["benchmark", "--root", str(mvtec_root), "--category", "nothing"])
    assert status == 1
    assert (
        f"folder not found: expected a directory at {mvtec_root / 'nothing'}"
        in capsys.readouterr().err
    )


def test_heatmaps_need_an_output_folder(mvtec_root, capsys):
    status = main(["benchmark", "--root", str(mvtec_root), "--category", "fabric", "--heatmaps"])
    assert status == 2
    assert "--heatmaps needs --output" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "COMMAND"),
        (["benchmark", "--category", "bottle"], "--root"),
        (
            ["benchmark", "--root", ".", "--category", "x", "--coreset-ratio", "2"],
            "in (0, 1], got 2",
        ),
        (
            ["benchmark", "--root", ".", "--category", "x", "--n-train", "0"],
            "positive integer, got 0",
        ),
    ],
)
def test_invalid_arguments_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_backbone_options_choose_the_extractor():
    lite0 = _make_extractor("efficientnet_lite0", layers=None, weights=None)
    assert isinstance(lite0, EfficientNetLite0Extractor)
    assert lite0.get_params() == EfficientNetLite0Extractor().get_params()
    resnet = _make_extractor("resnet18", layers=["layer1", "layer2"], weights="None")
    assert isinstance(resnet, TorchvisionExtractor)
    assert (resnet.backbone, resnet.layers, resnet.weights) == (
        "resnet18",
        ("layer1", "layer2"),
        None,
    )
    assert _make_extractor("wide_resnet50_2", None, "IMAGENET1K_V2").weights == "IMAGENET1K_V2"


def test_format_results_averages_over_categories_and_marks_missing_runs():
    base = dict(
        pixel_auroc=0.9,
        image_f1=0.9,
        aupro=0.8,
        fit_time_s=1.0,
        predict_time_ms=2.0,
        peak_memory_mib=100.0,
    )
    results = [
        dict(base, backbone="resnet18", category="bottle", image_auroc=1.0),
        dict(base, backbone="resnet18", category="metal_nut", image_auroc=0.5),
        dict(base, backbone="my_net", category="bottle", image_auroc=0.8),
    ]
    text = format_results(results)
    header, _, first, second = _table(text, "Image-Level AUC")
    assert header == ["", "Avg", "Bottle", "Metal Nut"]
    assert first == ["ResNet-18", "0.750", "1.000", "0.500"]
    assert second == ["my_net", "0.800", "0.800", "-"]


@pytest.fixture(scope="module")
def nested_root(tmp_path_factory):
    """Two datasets: one category with masks, one (image-level only) without ground_truth."""
    root = tmp_path_factory.mktemp("data")
    _write_category(root / "mvtec" / "fabric", seed=0)
    _write_category(root / "other" / "plain", seed=20)
    shutil.rmtree(root / "other" / "plain" / "ground_truth")
    (root / "notes").mkdir()  # not a category: no train/good
    return root


def test_find_categories_looks_one_and_two_levels_down(nested_root, mvtec_root):
    assert find_categories(nested_root) == ["mvtec/fabric", "other/plain"]
    assert find_categories(mvtec_root) == list(CATEGORIES)


def test_all_benchmarks_every_category_with_dashes_for_missing_masks(nested_root, capsys):
    status = main(["benchmark", "--root", str(nested_root), "--all", *TINY_RESNET])
    assert status == 0
    stdout = capsys.readouterr().out
    header, _, image_row = _table(stdout, "Image-Level AUC")
    assert header == ["", "Avg", "Fabric", "Plain"]
    assert all(0 <= float(v) <= 1 for v in image_row[1:])
    for title in ("Pixel-Level AUC", "Pixel-Level AUPRO"):
        _, _, row = _table(stdout, title)
        assert row[3] == "-"
        assert row[1] == row[2]  # the mean is over the categories with masks


def test_config_runs_a_named_preset(mvtec_root, monkeypatch, capsys):
    monkeypatch.setitem(
        PRESETS,
        "tiny",
        lambda: PatchCoreDetector(
            feature_extractor=TorchvisionExtractor("resnet18", weights=None), image_size=64
        ),
    )
    argv = ["benchmark", "--root", str(mvtec_root), "--category", "fabric", "--load-size", "64"]
    status = main([*argv, "--config", "tiny", "--algorithm", "exact"])
    assert status == 0
    _, _, row = _table(capsys.readouterr().out, "Image-Level AUC")
    assert row[0] == "tiny" and float(row[2]) >= 0.8


def test_config_keeps_the_presets_algorithm_unless_one_is_given():
    argv = ["benchmark", "--root", ".", "--all", "--config", "accurate"]
    args = _build_parser().parse_args(argv)
    assert _make_detector(args, "accurate").algorithm == "exact"  # the preset's own
    args = _build_parser().parse_args([*argv, "--algorithm", "pynndescent"])
    assert _make_detector(args, "accurate").algorithm == "pynndescent"
    args = _build_parser().parse_args(["benchmark", "--root", ".", "--all"])
    assert _make_detector(args, "resnet18").algorithm == "auto"


def test_config_and_backbone_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--root", ".", "--all", "--config", "fast", "--backbone", "resnet18"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_training_subset_is_a_seeded_choice_in_file_order():
    images = np.arange(50)
    first = _training_subset(images, 10, random_state=0)
    np.testing.assert_array_equal(first, _training_subset(images, 10, random_state=0))
    assert len(np.unique(first)) == 10 and (np.diff(first) > 0).all()
    assert not np.array_equal(first, images[:10])  # not simply the first files
    assert not np.array_equal(first, _training_subset(images, 10, random_state=1))
    assert _training_subset(images, 80, random_state=0) is images

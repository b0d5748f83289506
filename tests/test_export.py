"""export.py end to end: ONNX and pt2 round trips with their parity check, a
check that fails, usage errors; predict.py on the exported .onnx."""

import json
import shutil

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

import data
import export
import models
from checkpoint import build_model
from checkpoint import load as load_checkpoint
from conftest import assert_one_line_error, coloured_images, run_script, train_teacher, write_cifar10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher checkpoint trained by train.py on tiny CIFAR-10 data, flip TTA on."""
    root = tmp_path_factory.mktemp("export")
    write_cifar10(root / "data", per_class_train=10, per_class_test=4)
    return train_teacher(root / "data", root / "out", 4), root / "data"


def reference(checkpoint_path, images, tta=True):
    """The checkpoint's probabilities in PyTorch float32, computed without export.py."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint).eval()
    with torch.no_grad():
        return models.probabilities(model, data.normalize(images, checkpoint["mean"], checkpoint["std"]), tta)


def figures(stdout):
    """The largest difference and the agreement that export.py printed."""
    line = next(line for line in stdout.splitlines() if line.startswith("parity on"))
    largest = float(line.split("largest probability difference ")[1].split()[0])
    agreement = float(line.split("top-1 agreement ")[1].split("%")[0]) / 100
    return largest, agreement


@pytest.mark.slow
def test_onnx_round_trip_matches_pytorch_and_carries_the_class_names(trained, tmp_path):
    checkpoint, _ = trained
    out = tmp_path / "model.onnx"
    result = run_script("export.py", "--checkpoint", checkpoint, "--out", out)
    assert result.returncode == 0, result.stderr
    largest, agreement = figures(result.stdout)
    assert largest <= export.TOLERANCE and agreement >= export.MIN_AGREEMENT
    assert "1,000 generated images" in result.stdout
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    saved = load_checkpoint(checkpoint)
    assert json.loads(props["classes"]) == saved["classes"]
    preprocessing = json.loads(props["preprocessing"])
    assert preprocessing["mean"] == saved["mean"] and preprocessing["tta"] is True
    assert (preprocessing["image_size"], preprocessing["in_channels"]) == (32, 3)
    images = export.generated_images(50, 3, 32, seed=7)
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert got.shape == (50, 10) and torch.allclose(got.sum(1), torch.ones(50), atol=1e-5)
    assert (got - reference(checkpoint, images)).abs().max() <= export.TOLERANCE
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left


@pytest.mark.slow
def test_pt2_round_trip_matches_pytorch_and_carries_the_class_names(trained, tmp_path):
    checkpoint, _ = trained
    result = run_script("export.py", "--checkpoint", checkpoint, "--format", "pt2", "--out", tmp_path / "model.pt2")
    assert result.returncode == 0, result.stderr
    largest, agreement = figures(result.stdout)
    assert largest <= export.TOLERANCE and agreement >= export.MIN_AGREEMENT
    extra = {export.METADATA_FILE: ""}
    program = torch.export.load(tmp_path / "model.pt2", extra_files=extra).module()
    assert json.loads(json.loads(extra[export.METADATA_FILE])["classes"]) == load_checkpoint(checkpoint)["classes"]
    images = export.generated_images(3, 3, 32, seed=3)  # another batch size than the export's example
    assert (program(images) - reference(checkpoint, images)).abs().max() <= export.TOLERANCE


@pytest.mark.slow
def test_defaults_export_the_distilled_checkpoint_beside_it_and_no_tta_turns_flips_off(trained, tmp_path):
    checkpoint, _ = trained
    folder = tmp_path / "cifar10"
    folder.mkdir()
    shutil.copy(checkpoint, folder / "distilled.pt")
    result = run_script("export.py", "--out-dir", tmp_path, "--no-tta")
    assert result.returncode == 0, result.stderr
    session = onnxruntime.InferenceSession(str(folder / "distilled.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])["tta"] is False
    images = export.generated_images(20, 3, 32, seed=5)
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert (got - reference(folder / "distilled.pt", images, tta=False)).abs().max() <= export.TOLERANCE


@pytest.mark.slow
def test_data_dir_checks_on_the_test_split_topped_up_to_a_thousand(trained, tmp_path):
    checkpoint, data_dir = trained
    result = run_script("export.py", "--checkpoint", checkpoint, "--out", tmp_path / "m.onnx", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    source = data_dir / "cifar-10-python.tar.gz"
    assert f"parity on 1,000 images (40 test images of {source}, 960 generated)" in result.stdout


@pytest.mark.slow
def test_a_data_dir_without_the_data_is_one_line_and_not_replaced_by_the_bundled_copy(trained, tmp_path):
    checkpoint, _ = trained
    (tmp_path / "empty").mkdir()
    result = run_script("export.py", "--checkpoint", checkpoint, "--out", tmp_path / "m.onnx",
                        "--data-dir", tmp_path / "empty")  # fmt: skip
    assert_one_line_error(result, code=2)
    assert result.stderr == (
        f"export.py: error: argument --data-dir: no cifar10 data in {tmp_path / 'empty'}: put cifar-10-python.tar.gz "
        f"there, or point --data-dir at it\n"
    )
    assert result.stdout == "" and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_model_changed_after_export_fails_the_check_and_leaves_no_file(trained, tmp_path, monkeypatch, capsys, fmt):
    checkpoint, _ = trained
    writer = f"write_{fmt}"
    original = getattr(export, writer)

    def write_then_change(module, example, path, props=None):
        original(module, example, path, props)
        with torch.no_grad():  # the PyTorch model no longer computes what was written: it ignores its input
            module.model.head[0].weight.zero_()

    monkeypatch.setattr(export, writer, write_then_change)
    out = tmp_path / f"model.{fmt}"
    assert export.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (
        "parity check failed" in err and f"nothing was written to {out}" in err and len(err.strip().splitlines()) == 1
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_usage_errors_are_one_line(trained, tmp_path):
    checkpoint, _ = trained
    result = run_script("export.py", "--out-dir", tmp_path, "--dataset", "cifar100")
    assert_one_line_error(result, "no checkpoint at", f"python3 train.py --dataset cifar100 --out-dir {tmp_path}",
                          code=2)  # fmt: skip
    result = run_script("export.py", "--checkpoint", checkpoint, "--out", tmp_path / "model.pt2")
    assert_one_line_error(result, "--out", "must end in .onnx", code=2)
    result = run_script("export.py", "--checkpoint", checkpoint, "--out", tmp_path / "nowhere" / "m.onnx")
    assert_one_line_error(result, "--out", "is not a folder", code=2)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    result = run_script("export.py", "--checkpoint", tmp_path / "text.pt")
    assert_one_line_error(result, "text.pt", "not a checkpoint written by train.py", code=2)
    result = run_script("export.py", "--checkpoint", checkpoint, "--data-dir", tmp_path / "none")
    assert_one_line_error(result, "--data-dir", "is not a folder", code=2)
    result = run_script("export.py", "--checkpoint", checkpoint, "--format", "tflite")
    assert_one_line_error(result, "--format", code=2)
    assert not list(tmp_path.glob("*.onnx")) and not checkpoint.with_suffix(".onnx").exists()


# ---------------------------------------------------------------- predict.py with an exported file


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    checkpoint, _ = trained
    out = tmp_path_factory.mktemp("exported") / "teacher.onnx"
    result = run_script("export.py", "--checkpoint", checkpoint, "--out", out)
    assert result.returncode == 0, result.stderr
    return checkpoint, out


@pytest.mark.slow
def test_predict_with_the_onnx_file_gives_the_checkpoints_answers_bad_files_included(exported, tmp_path):
    checkpoint, onnx_file = exported
    files = []
    for i, label in enumerate([0, 4, 8, 3, 1]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(coloured_images([label], size=45, seed=30 + i)[0]).save(path)
        files.append(path)
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    files += [tmp_path / "text.jpg", tmp_path / "empty.png", tmp_path / "missing.png"]
    runs = {}
    for name, model_file in (("pt", checkpoint), ("onnx", onnx_file)):
        plain = run_script("predict.py", "--checkpoint", model_file, *files, "--top-k", "3")
        as_json = run_script("predict.py", "--checkpoint", model_file, *files, "--top-k", "3", "--json")
        runs[name] = plain, as_json
    for plain_pt, plain_onnx in zip(runs["pt"], runs["onnx"]):
        assert plain_pt.returncode == plain_onnx.returncode == 1
        assert plain_pt.stderr == plain_onnx.stderr and len(plain_pt.stderr.splitlines()) == 3
    assert runs["pt"][0].stdout == runs["onnx"][0].stdout  # percentages rounded to 0.1
    for item_pt, item_onnx in zip(json.loads(runs["pt"][1].stdout), json.loads(runs["onnx"][1].stdout)):
        assert item_pt["file"] == item_onnx["file"] and item_pt.get("error") == item_onnx.get("error")
        for a, b in zip(item_pt.get("predictions", []), item_onnx.get("predictions", [])):
            assert a["class"] == b["class"] and abs(a["prob"] - b["prob"]) <= 1e-5


@pytest.mark.slow
def test_predict_evaluate_with_the_onnx_file(exported, tmp_path):
    checkpoint, onnx_file = exported
    tree = tmp_path / "tree"
    for label in (0, 1, 2):
        (tree / load_checkpoint(checkpoint)["classes"][label]).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(coloured_images([label], seed=60 + 3 * label + i)[0]).save(
                tree / load_checkpoint(checkpoint)["classes"][label] / f"{i}.png"
            )
    results = [run_script("predict.py", "--checkpoint", f, tree, "--evaluate") for f in (checkpoint, onnx_file)]
    assert all(r.returncode == 0 for r in results), results[1].stderr
    assert results[0].stdout.splitlines()[:-1] == results[1].stdout.splitlines()[:-1]  # all but the timing line


def bad_onnx(kind, tmp_path, onnx_file):
    path = tmp_path / f"{kind}.onnx"
    if kind == "truncated":
        blob = onnx_file.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "text":
        path.write_text("just some text")
    elif kind == "no-metadata":  # a valid ONNX model that export.py did not write
        export.write_onnx(models.build("airnet_xs", 10).eval(), torch.zeros(2, 3, 32, 32), path)
    return path


BAD_ONNX = {
    "missing": "no checkpoint at",
    "truncated": "not a readable ONNX file",
    "text": "not a readable ONNX file",
    "no-metadata": "without this repo's metadata",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BAD_ONNX))
def test_bad_onnx_file_is_one_line(exported, tmp_path, kind):
    _, onnx_file = exported
    good = tmp_path / "good.png"
    Image.fromarray(coloured_images([1])[0]).save(good)
    path = bad_onnx(kind, tmp_path, onnx_file)
    result = run_script("predict.py", "--checkpoint", path, good)
    assert_one_line_error(result, str(path), BAD_ONNX[kind], code=2)


@pytest.mark.slow
def test_onnx_input_is_the_uint8_batch_predict_decodes(exported):
    _, onnx_file = exported
    classifier = export.OnnxClassifier(onnx_file)
    assert classifier.info["image_size"] == 32 and classifier.info["in_channels"] == 3
    images = torch.from_numpy(np.stack([coloured_images([2])[0].transpose(2, 0, 1)]))
    assert classifier(images).shape == (1, 10)

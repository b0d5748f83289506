"""The plan of a run, called directly: every action, every refusal, and the
command printed after each kind of stop."""

import pytest
import torch

import checkpoint
import config
import models
import plan
from conftest import tensor_dataset

CPU = torch.device("cpu")
FLAGS = ["--teacher", "airnet_xs", "--student", "airnet_xs", "--epochs", "1", "--device", "cpu"]
DATASET = tensor_dataset(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4) % 2, 2)


def settings(*flags):
    return config.parse([*FLAGS, *flags])


def save_finished(folder, stage, cfg, **changes):
    """A finished stage as train.py saves it (test accuracy 50%), with `changes` to its content."""
    folder.mkdir(parents=True, exist_ok=True)
    name = cfg["TEACHER"] if stage == "teacher" else cfg["STUDENT"]
    digest = checkpoint.file_digest(folder / "teacher.pt") if stage == "distilled" else None
    content = {"stage": stage, "model": name, "num_classes": 2, "in_channels": 3, "classes": ["0", "1"],
               "state_dict": models.build(name, 2, 3).state_dict(), "config": checkpoint.json_safe(cfg),
               "metrics": {"test_acc": 0.5}, "teacher_digest": digest, **changes}  # fmt: skip
    checkpoint.save(folder / f"{stage}.pt", content)


def save_unfinished(folder, stage, cfg, **changes):
    """The progress of a stage stopped at epoch 3, step 2, as train.py saves it."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = checkpoint.file_digest(folder / "teacher.pt") if stage == "distilled" else None
    state = {"stage": stage, "config": checkpoint.json_safe(cfg), "device": "cpu", "teacher": digest,
             "progress": {"epoch": 3, "step": 2}, **changes}  # fmt: skip
    checkpoint.save_progress(folder / f"{stage}.last.pt", state)


def make(folder, *flags, argv=None):
    cfg = settings(*flags)
    return plan.make(cfg, DATASET, CPU, folder, FLAGS + list(flags) if argv is None else argv)


def actions(decided):
    return {stage: row.action for stage, row in decided.rows.items()}


def refusal(folder, *flags):
    with pytest.raises(plan.TrainingError) as error:
        make(folder, *flags)
    return str(error.value), error.value.exit_code


def one_line_exit(capsys, check, *args):
    """The message of a check that stops with config.fail: exit 2, one line, without the program's name."""
    with pytest.raises(SystemExit) as stop:
        check(*args)
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(lines) == 1
    return lines[0].split(": error: ", 1)[1]


def test_stages_written_with_spaces_are_the_same_stages(tmp_path):
    for written in ("teacher, student", " teacher ,student", "teacher,student"):
        assert actions(make(tmp_path, "--stages", written)) == {"teacher": "train", "student": "train",
                                                                 "distilled": "skip"}  # fmt: skip


def test_an_empty_folder_trains_every_stage_and_prints_the_resolved_settings(tmp_path):
    decided = make(tmp_path, "--dataset", "cifar100")
    assert actions(decided) == {"teacher": "train", "student": "train", "distilled": "train"}
    assert [row.reason for row in decided.rows.values()] == ["in --stages"] * 3
    # the default recipe's CIFAR-100 settings, as resolved, and the other settings of the run
    assert decided.rows["distilled"].settings == (  # auto: the student has the teacher's shape, so it starts as it
        "airnet_xs, 1 epoch, lr 0.008, method kd, temperature 1, alpha 0.9, student from the teacher"
    )
    lines = decided.text().splitlines()
    threads = f"{torch.get_num_threads()} thread" + "s" * (torch.get_num_threads() != 1)
    assert lines[0] == f"plan: cifar100 from test, 2 classes; on cpu with {threads}; seed 0"
    assert lines[3] == "  train    distilled: in --stages [" + decided.rows["distilled"].settings + "]"
    assert decided.records()[0] == {"stage": "teacher", "action": "train", "reason": "in --stages",
                                    "settings": "airnet_xs, 1 epoch, lr 0.008"}  # fmt: skip
    assert "| student | train | airnet_xs, 1 epoch, lr 0.008 | in --stages |" in decided.markdown()


def test_the_distilled_stage_alone_trains_the_missing_teacher_first(tmp_path):
    decided = make(tmp_path, "--stages", "distilled")
    assert actions(decided) == {"teacher": "train", "student": "skip", "distilled": "train"}
    assert decided.rows["teacher"].reason == "distilled needs a teacher and none is saved: training the teacher first"
    assert decided.rows["student"].reason == "not in --stages, and none is saved"


def test_finished_stages_are_kept_and_their_teacher_is_built_for_the_distilled_stage(tmp_path):
    cfg = settings()
    save_finished(tmp_path, "teacher", cfg)
    save_finished(tmp_path, "student", cfg)
    decided = make(tmp_path)
    assert actions(decided) == {"teacher": "keep", "student": "keep", "distilled": "train"}
    assert decided.rows["student"].reason == (
        f"{tmp_path / 'student.pt'} exists (test accuracy 50.00%); skipping it (--fresh retrains)"
    )
    assert decided.rows["student"].saved["metrics"] == {"test_acc": 0.5}
    model, digest = decided.teacher
    assert isinstance(model, models.Classifier) and digest == checkpoint.file_digest(tmp_path / "teacher.pt")
    kept = make(tmp_path, "--stages", "student")  # a finished stage left out of --stages is still reported
    assert actions(kept) == {"teacher": "keep", "student": "keep", "distilled": "skip"}
    assert kept.rows["teacher"].reason.endswith("exists (test accuracy 50.00%); not in --stages, reported")
    assert kept.teacher == (None, None)  # no stage learns from it


def test_fresh_retrains_what_exists_and_trains_what_does_not(tmp_path):
    save_finished(tmp_path, "teacher", settings())
    decided = make(tmp_path, "--stages", "teacher,student", "--fresh")
    assert actions(decided) == {"teacher": "retrain", "student": "train", "distilled": "skip"}
    assert decided.rows["teacher"].reason == f"in --stages; {tmp_path / 'teacher.pt'} exists; retraining it (--fresh)"


def test_a_stage_of_other_settings_is_left_out_refused_or_retrained_with_fresh(tmp_path):
    save_finished(tmp_path, "teacher", settings("--weight-decay", "0.1"))
    left_out = make(tmp_path, "--stages", "student")
    assert actions(left_out) == {"teacher": "skip", "student": "train", "distilled": "skip"}
    assert left_out.rows["teacher"].reason == f"{tmp_path / 'teacher.pt'} was made with other settings; left out of " \
        "the results"  # fmt: skip
    assert left_out.left_out() == {"teacher": ["--weight-decay 0.1 then, 0.05 now"]}
    assert refusal(tmp_path, "--stages", "distilled") == (
        f"{tmp_path / 'teacher.pt'} was made with other settings (--weight-decay 0.1 then, 0.05 now); pass --fresh "
        f"to retrain it, or choose another --out-dir",
        2,
    )
    fresh = make(tmp_path, "--stages", "distilled", "--fresh")  # the teacher it needs is retrained
    assert actions(fresh) == {"teacher": "retrain", "student": "skip", "distilled": "train"}
    assert fresh.rows["teacher"].reason == (
        f"{tmp_path / 'teacher.pt'} was made with other settings; retraining it (--fresh)"
    )


def test_a_stage_of_images_of_another_size_is_left_out(tmp_path):
    """Whatever the dataset: a loader of one's own may resize by IMAGE_SIZE, which shapes folder datasets alone."""
    save_finished(tmp_path, "teacher", settings(), image_size=16)
    assert make(tmp_path, "--stages", "student").left_out() == {"teacher": ["the images' size (16 then, 32 now)"]}
    save_finished(tmp_path, "teacher", settings(), image_size=32)
    assert actions(make(tmp_path, "--stages", "teacher")) == {"teacher": "keep", "student": "skip", "distilled": "skip"}
    folder = ["--dataset", "folder", "--data-dir", str(tmp_path)]  # the setting names the change once, not twice
    save_finished(tmp_path, "teacher", settings(*folder, "--image-size", "16"), image_size=16)
    assert make(tmp_path, *folder, "--stages", "student").left_out() == {"teacher": ["--image-size 16 then, 32 now"]}


def test_a_distilled_stage_of_another_teacher_is_refused(tmp_path):
    cfg = settings()
    save_finished(tmp_path, "teacher", cfg)
    save_finished(tmp_path, "distilled", cfg, teacher_digest="0123456789abcdef")
    message, code = refusal(tmp_path, "--stages", "distilled")
    assert code == 2 and "(the teacher (another teacher.pt)); pass --fresh" in message


def test_resume_continues_an_unfinished_stage_and_says_when_there_is_none(tmp_path):
    save_unfinished(tmp_path, "teacher", settings())
    decided = make(tmp_path, "--resume")
    assert actions(decided) == {"teacher": "resume", "student": "train", "distilled": "train"}
    assert decided.rows["teacher"].progress["progress"] == {"epoch": 3, "step": 2}
    assert decided.rows["teacher"].reason == f"in --stages; resuming {tmp_path / 'teacher.last.pt'} at epoch 3, step 2"
    assert decided.rows["student"].reason == (
        f"in --stages; nothing to resume for student (no {tmp_path / 'student.last.pt'}); training it from the start"
    )
    fresh = make(tmp_path, "--resume", "--fresh")  # a --fresh retrain stopped part-way goes on
    assert actions(fresh)["teacher"] == "resume"
    assert actions(make(tmp_path, "--fresh"))["teacher"] == "train"  # --fresh alone starts it over


UNFINISHED = [
    ({}, [], " holds an unfinished teacher run; continue it with: python3 train.py --teacher airnet_xs --student "
     "airnet_xs --epochs 1 --device cpu --stages teacher --resume  (or pass --fresh to start the stage over)"),
    ({"device": "cuda"}, ["--resume"], " was started on cuda; resume it with --device cuda, or pass --fresh"),
    ({"device": "cuda"}, ["--resume", "--fresh"], " was started on cuda; resume it with --device cuda, or leave out "
     "--resume to start it over"),
    ({"config": checkpoint.json_safe(settings("--lr", "0.1"))}, ["--resume"], " was started with other settings "
     "(--lr 0.1 then, 0.008 now); resume with those, or pass --fresh"),
    ({"format": 1}, ["--resume"], ": written by an older version of this repo (file format 1; this version reads "
     f"{checkpoint.FORMAT}); pass --fresh"),
    ({"progress": None}, ["--resume"], ": not a resume file of train.py (it holds no progress); delete it or pass "
     "--fresh"),
]  # fmt: skip


@pytest.mark.parametrize("changes,flags,message", UNFINISHED, ids=["no --resume", "device", "device with --fresh",
                                                                    "settings", "format", "no progress"])  # fmt: skip
def test_an_unfinished_stage_that_cannot_go_on_is_refused(tmp_path, changes, flags, message):
    save_unfinished(tmp_path, "teacher", settings())
    last = tmp_path / "teacher.last.pt"
    content = {**torch.load(last, weights_only=True), **changes}  # as written by hand: any format, any content
    torch.save({k: v for k, v in content.items() if v is not None}, last)
    assert refusal(tmp_path, "--stages", "teacher", *flags) == (f"{last}{message}", 2)


def test_an_unfinished_distilled_stage_of_another_teacher_is_refused(tmp_path):
    cfg = settings()
    save_finished(tmp_path, "teacher", cfg)
    save_unfinished(tmp_path, "distilled", cfg, teacher="0123456789abcdef")
    message, code = refusal(tmp_path, "--stages", "distilled", "--resume")
    assert code == 2 and "(the teacher (another teacher.pt)); resume with those, or pass --fresh" in message


def test_saved_files_that_cannot_be_used_are_refused(tmp_path):
    cfg = settings()
    (tmp_path / "teacher.pt").mkdir(parents=True)
    assert refusal(tmp_path) == (f"{tmp_path / 'teacher.pt'}: cannot read it (Is a directory)", 1)
    (tmp_path / "teacher.pt").rmdir()
    (tmp_path / "teacher.pt").write_text("not a checkpoint")
    assert refusal(tmp_path) == (f"{tmp_path / 'teacher.pt'}: not a checkpoint written by train.py (not a torch "
                                 "file); delete it or pass --fresh to retrain", 1)  # fmt: skip
    save_finished(tmp_path, "teacher", cfg)
    content = torch.load(tmp_path / "teacher.pt", weights_only=True)
    torch.save({**content, "format": 1}, tmp_path / "teacher.pt")
    assert refusal(tmp_path) == (f"{tmp_path / 'teacher.pt'}: written by an older version of this repo (file "
                                 f"format 1; this version reads {checkpoint.FORMAT}); pass --fresh to retrain it",
                                 2)  # fmt: skip
    del content["metrics"]
    torch.save(content, tmp_path / "teacher.pt")
    assert refusal(tmp_path) == (f"{tmp_path / 'teacher.pt'} is not a finished stage of train.py (no metrics); "
                                 "pass --fresh to retrain it", 1)  # fmt: skip
    save_finished(tmp_path, "teacher", cfg, state_dict=models.build("airnet_s", 2, 3).state_dict())
    message, code = refusal(tmp_path, "--stages", "distilled")  # a saved teacher that does not fit its model
    assert code == 1 and message.startswith(f"{tmp_path / 'teacher.pt'}: its weights do not fit model 'airnet_xs'")
    assert message.endswith("; pass --fresh to retrain the teacher")


def test_a_brought_teacher_is_kept_and_one_that_does_not_fit_is_refused(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(models.build("airnet_xs", 2, 3).state_dict(), path)
    decided = make(tmp_path / "out", "--teacher-checkpoint", str(path), "--stages", "distilled")
    assert actions(decided) == {"teacher": "keep", "student": "skip", "distilled": "train"}
    assert decided.rows["teacher"].reason == f"{path} (a state dict), brought with --teacher-checkpoint"
    assert decided.teacher[1] == checkpoint.file_digest(path) and decided.brought == "a state dict"
    message, code = refusal(tmp_path / "out", "--teacher-checkpoint", str(path), "--teacher", "airnet_s")
    assert code == 2 and message.startswith(f"argument --teacher-checkpoint: {path}: its weights do not fit airnet_s")
    assert one_line_exit(capsys, make, tmp_path / "out", "--teacher-checkpoint", str(tmp_path / "none.pt")) == (
        f"argument --teacher-checkpoint: {tmp_path / 'none.pt'}: no such file; give the path of a teacher checkpoint"
    )


def test_the_teachers_route_reaches_the_distilled_stage_and_a_teacher_without_one_says_so(tmp_path, capsys):
    cfg = settings()
    early = models.build("airnet_xs", 2, 3).state_dict()
    save_finished(tmp_path, "teacher", cfg, anchors=[{"epoch": 1, "state": early}])
    decided = make(tmp_path, "--stages", "distilled", "--route")
    assert [state.keys() for state in decided.route] == [early.keys()]
    assert decided.rows["distilled"].reason == "in --stages"
    assert decided.rows["distilled"].settings.endswith(", route")
    path = tmp_path / "weights.pt"
    torch.save(early, path)
    decided = make(tmp_path / "out", "--teacher-checkpoint", str(path), "--stages", "distilled", "--route")
    assert decided.route == [] and decided.rows["distilled"].reason == (
        "in --stages; the teacher kept no weights from its training, so it teaches with its final weights alone "
        "(--route has no effect)"
    )
    assert one_line_exit(capsys, make, tmp_path / "out", "--student-init", "teacher", "--teacher", "resnet8") == (
        "argument --student-init: airnet_xs cannot start from resnet8's weights (the teacher has no tensor "
        "whiten.weight); it takes a narrower or shallower student of the teacher's family (airnet_xs of airnet_m, "
        "resnet8x4 of resnet32x4, wrn_16_2 of wrn_40_2), or pass --student-init random"
    )
    assert make(tmp_path / "out", "--student-init", "teacher", "--teacher", "airnet_m").rows["distilled"].settings == (
        "airnet_xs, 1 epoch, lr 0.008, method kd, temperature 2, alpha 0.5, student from the teacher"
    )
    assert make(tmp_path / "out", "--teacher", "resnet8").rows["distilled"].settings == (  # auto, where it cannot
        "airnet_xs, 1 epoch, lr 0.008, method kd, temperature 2, alpha 0.5, student from random weights (auto: the "
        "teacher has no tensor whiten.weight)"
    )
    assert one_line_exit(capsys, make, tmp_path / "out", "--teacher-mirror", "--method", "fitnet") == (
        "argument --teacher-mirror: fitnet learns from the teacher's features, which the mirror does not average (it "
        "averages logits); leave it off, or choose kd, dkd or lskd"
    )


def test_a_stage_saved_before_a_setting_was_added_is_taken_as_made_with_its_old_default(tmp_path):
    cfg = settings()
    save_finished(tmp_path, "teacher", cfg)
    older = {k: v for k, v in checkpoint.json_safe(cfg).items() if k not in config.ADDED_SETTINGS}
    save_finished(tmp_path, "distilled", cfg, config=older)  # made as --student-init random makes it
    assert actions(make(tmp_path, "--student-init", "random")) == {"teacher": "keep", "student": "train",
                                                                  "distilled": "keep"}  # fmt: skip
    assert make(tmp_path, "--stages", "student").rows["distilled"].changed == ["--student-init random then, auto now"]


def test_settings_that_the_folders_or_the_data_refuse_stop_in_one_line(tmp_path, capsys):
    assert plan.out_folder(settings("--out-dir", str(tmp_path)), 2) == tmp_path / "cifar10"
    assert one_line_exit(capsys, plan.out_folder, settings("--batch-size", "15"), 2) == (
        "argument --batch-size: 15 does not split evenly over the 2 processes of this torchrun job; give a multiple "
        "of 2"
    )
    (tmp_path / "file").write_text("")
    assert one_line_exit(capsys, plan.out_folder, settings("--out-dir", str(tmp_path / "file")), 1).startswith(
        f"argument --out-dir: cannot write to {tmp_path / 'file' / 'cifar10'} ("
    )
    assert one_line_exit(capsys, plan.data_folder, settings("--data-dir", str(tmp_path / "file"))).startswith(
        f"argument --data-dir: {tmp_path / 'file'} is a file, but the flag takes a folder: for cifar10 it looks"
    )
    missing = str(tmp_path / "missing")
    assert one_line_exit(capsys, plan.data_folder, settings("--data-dir", missing, "--dataset", "folder")) == (
        f"argument --data-dir: {missing} does not exist; point it at the image tree of --dataset folder"
    )
    assert one_line_exit(capsys, plan.data_folder, settings("--data-dir", missing, "--no-download")) == (
        f"argument --data-dir: {missing} does not exist; point it at the cifar10 data, or pass --download to "
        f"download it into {missing}"
    )
    assert plan.data_folder(settings("--data-dir", missing)) is False  # it is downloaded into
    assert plan.data_folder(settings("--no-download")) is True  # the default folder: the bundled copy stands in
    assert one_line_exit(capsys, make, tmp_path, "--crop-padding", "32") == (
        "argument --crop-padding: 32 pixels is not less than the 32-pixel images; give a smaller value (0 turns "
        "translation off)"
    )


def test_the_command_after_a_stop_comes_from_the_plan(tmp_path):
    typed = ["--stages", "teacher,student", "--fresh", "--lr", "0.01"]
    decided = make(tmp_path, *typed, argv=typed)
    assert decided.go_on() == f"nothing was trained yet. Run it again with: python3 train.py {' '.join(typed)}"
    decided.rows["teacher"].begun = decided.rows["teacher"].done = True
    decided.rows["student"].begun = True  # a --fresh run goes on with the stages it has still to retrain
    assert decided.go_on() == (
        "progress is saved. Continue with: python3 train.py --lr 0.01 --stages student --fresh --resume"
    )
    plain = make(tmp_path, "--lr", "0.01", "--resume", argv=["--lr", "0.01", "--resume"])
    plain.rows["teacher"].begun = True  # a plain run resumes the unfinished stages as they are
    assert plain.go_on() == "progress is saved. Continue with: python3 train.py --lr 0.01 --resume"
    before = plan.Plan(["--lr", "0.01"], "train.py", torchrun=True)  # stopped before the plan was made
    assert before.go_on() == (
        "nothing was trained yet. Run it again with: python3 train.py --lr 0.01 (through the same torchrun command)"
    )

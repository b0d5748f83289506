"""What a run of train.py does with each stage, decided once, before any work.

`make` reads what OUT_DIR/<dataset>/ holds (finished checkpoints, the
progress of unfinished stages) and a teacher brought with
--teacher-checkpoint, and returns one row per stage: its action and why.

- train: trained from the start;
- resume: continued from its <stage>.last.pt (--resume);
- retrain: trained from the start over its finished checkpoint (--fresh);
- keep: a finished checkpoint (or the brought teacher) is used as it is, and reported;
- skip: neither trained nor reported.

Every refusal is raised here, before anything trains: a stage saved with
other settings that the run needs, an unfinished stage without --resume, a
file that cannot be read, a teacher that does not fit, and the settings that
the folders or the data refuse (out_folder and data_folder, checked before
the data loads). The command printed after a stop comes from the plan too
(Plan.go_on).
"""

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

import checkpoint
import config
import datafiles
import distill
import models
import pretrained
import runtime

STAGES = config.STAGE_NAMES
NO_ROUTE = (
    "the teacher kept no weights from its training, so it teaches with its final weights alone (--route has no effect)"
)


class TrainingError(Exception):
    """Training cannot go on (a saved stage is in the way, the loss diverged...): one line, and an exit status."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Row:
    """What happens to one stage, and why."""

    stage: str
    action: str  # train | resume | retrain | keep | skip
    reason: str
    settings: str = ""  # those that shape the stage, as resolved (stages that train or are kept)
    saved: dict | None = None  # keep: the finished checkpoint
    progress: dict | None = None  # resume: the saved progress of the stage
    changed: list = field(default_factory=list)  # a stage left out for its other settings: what differs
    begun: bool = False  # set by train.py when the stage starts training in this run
    done: bool = False  # and when it is saved

    @property
    def trains(self):
        return self.action in ("train", "resume", "retrain")

    def record(self):
        """The row for results.json."""
        return {"stage": self.stage, "action": self.action, "reason": self.reason, "settings": self.settings}


@dataclass
class Plan:
    """The rows of a run, in stage order, and the command it was started with."""

    argv: list  # the arguments as typed
    program: str = "train.py"
    torchrun: bool = False
    fresh: bool = False
    heading: str = ""
    rows: dict = field(default_factory=dict)  # stage -> Row
    teacher: tuple = (None, None)  # the network the distilled stage learns from, and its file's digest
    route: list = field(default_factory=list)  # the teacher's weights kept during its training (ROUTE)
    brought: str = ""  # what the --teacher-checkpoint file held, in a few words

    def training(self):
        return [row for row in self.rows.values() if row.trains]

    def text(self):
        """The plan as printed at the start of a run."""
        lines = [f"{row.action:<8} {row.stage}: {row.reason}" + (f" [{row.settings}]" if row.settings else "")
                 for row in self.rows.values()]  # fmt: skip
        return "\n".join([self.heading, *(f"  {line}" for line in lines)])

    def markdown(self):
        """The plan for results.md."""
        lines = ["| stage | action | settings | reason |", "|---|---|---|---|"]
        lines += [f"| {r.stage} | {r.action} | {r.settings or '-'} | {r.reason} |" for r in self.rows.values()]
        return f"{self.heading}\n\n" + "\n".join(lines) + "\n"

    def records(self):
        """The rows for results.json."""
        return [row.record() for row in self.rows.values()]

    def left_out(self):
        """The saved stages left out of the results for their other settings, with what differs."""
        return {row.stage: row.changed for row in self.rows.values() if row.changed}

    def command(self, args):
        return shlex.join(["python3", self.program, *args]) + (
            " (through the same torchrun command)" if self.torchrun else ""
        )

    def resume_command(self, retrain=()):
        """This run's command with --resume (unfinished stages continue from their
        .last.pt); with `retrain`, only those stages, with --fresh as well: a
        --fresh run's stages retrained where their retraining stopped, not their
        old checkpoints kept."""
        args, value_of_stages = [], False
        for arg in self.argv:
            if not (value_of_stages or arg in ("--resume", "--fresh") or retrain and arg.startswith("--stages")):
                args.append(arg)
            value_of_stages = bool(retrain) and arg == "--stages"
        return self.command([*args, *(["--stages", ",".join(retrain), "--fresh"] if retrain else []), "--resume"])

    def go_on(self):
        """After a stop, what to run: --resume once a stage has begun training
        in this run (in a --fresh run, with the stages still to retrain); before
        that, the command as typed, which has done nothing yet."""
        if not any(row.begun for row in self.rows.values()):
            return f"nothing was trained yet. Run it again with: {self.command(self.argv)}"
        retrain = [row.stage for row in self.training() if self.fresh and not row.done]
        return f"progress is saved. Continue with: {self.resume_command(retrain)}"


def out_folder(cfg, world_size):
    """The output folder, OUT_DIR/<dataset> (for a folder dataset, the data
    folder's name: config.output_name), once the settings that need no data
    are checked: --batch-size against the processes of a torchrun job
    (DDP averages their gradients with equal weights) and --out-dir, which
    must be writable now, not after an hour of training."""
    if cfg["BATCH_SIZE"] % world_size:
        config.fail("batch-size", f"{cfg['BATCH_SIZE']} does not split evenly over the {world_size} processes of this "
                    f"torchrun job; give a multiple of {world_size}")  # fmt: skip
    out_dir = Path(cfg["OUT_DIR"]) / config.output_name(cfg["DATASET"], cfg["DATA_DIR"])
    if reason := checkpoint.unwritable(out_dir):
        config.fail("out-dir", f"cannot write to {out_dir} ({reason}); choose a writable --out-dir")
    return out_dir


def data_folder(cfg):
    """Whether data other than DATA_DIR's may stand in (data.load's
    fallback), once --data-dir is checked. The bundled CIFAR-10 and the
    system Fashion-MNIST stand in for the default folder alone: a folder the
    user names is meant to hold the data or to receive its download, and one
    that does not exist is most likely a typo, refused here unless something
    will be downloaded into it."""
    folder, dataset = cfg["DATA_DIR"], cfg["DATASET"]
    if Path(folder).is_file():
        config.fail("data-dir", f"{folder} is a file, but the flag takes a folder: for {dataset} it looks there "
                    f"for {datafiles.expected_contents(dataset)}")  # fmt: skip
    default = Path(folder) == Path(config.DATA_DIR)
    if not Path(folder).is_dir() and dataset == "folder":
        config.fail("data-dir", f"{folder} does not exist; point it at the image tree of --dataset folder")
    if not Path(folder).is_dir() and not cfg["DOWNLOAD"] and (dataset == "cifar100" or not default):
        config.fail("data-dir", f"{folder} does not exist; point it at the {dataset} data, or pass --download to "
                    f"download it into {folder}")  # fmt: skip
    return default


def make(cfg, dataset, device, out_dir, argv=(), program="train.py", torchrun=False):
    """The plan of a run, or the refusal that stops it. A saved stage whose
    settings differ from this run's is never reused: it stops the run when it
    is asked for (or needed as the teacher), and is left out of the results
    otherwise."""
    refuse_settings(cfg, dataset)
    decided = Plan(list(argv), program, torchrun, cfg["FRESH"], heading(cfg, dataset, device))
    brought = cfg["TEACHER_CHECKPOINT"]  # a teacher brought along is not trained
    requested = [s for s in STAGES if s in config.stage_list(cfg["STAGES"]) and not (brought and s == "teacher")]
    finished, stale = saved_stages(cfg, dataset, out_dir, requested)
    if "distilled" in requested and not brought and not {"teacher", "distilled"} & finished.keys():
        requested = list(dict.fromkeys(["teacher", *requested]))  # the teacher first, where none is saved
    refuse_stale(cfg, out_dir, requested, stale)
    reasons = why_trained(cfg, out_dir, requested, stale)
    if brought:
        model, digest, decided.brought, decided.route = brought_teacher(cfg, dataset)
        decided.teacher = (model, digest)
        decided.rows["teacher"] = Row("teacher", "keep", f"{brought} ({decided.brought}), brought with "
                                      "--teacher-checkpoint", f"{cfg['TEACHER']}, not trained by this run")  # fmt: skip
    elif "teacher" in finished and "distilled" in requested and "distilled" not in finished:
        decided.teacher, decided.route = saved_teacher(out_dir, finished["teacher"])  # checked now, not later
    digest = checkpoint.file_digest(brought or out_dir / "teacher.pt") if brought or "teacher" in finished else None
    for stage in STAGES:
        if stage in decided.rows:
            continue
        if stage in requested and stage not in finished:
            teacher_digest = digest if stage == "distilled" else None
            decided.rows[stage] = trained_row(decided, stage, cfg, device, out_dir, teacher_digest, reasons[stage])
            if stage == "distilled" and cfg["ROUTE"] and decided.teacher[0] is not None and not decided.route:
                decided.rows[stage].reason += f"; {NO_ROUTE}"
        else:
            decided.rows[stage] = kept_row(stage, cfg, out_dir, stage in requested, finished.get(stage),
                                           stale.get(stage))  # fmt: skip
    return decided


def refuse_settings(cfg, dataset):
    """Stop the run on settings that this dataset, or the files they name, refuse."""
    if cfg["CROP_PADDING"] >= min(dataset.train_x.shape[-2:]):  # reflection cannot reach further than the image
        config.fail("crop-padding", f"{cfg['CROP_PADDING']} pixels is not less than the {dataset.image_size}-pixel "
                    f"images; give a smaller value (0 turns translation off)")  # fmt: skip
    brought = cfg["TEACHER_CHECKPOINT"]
    if brought and not Path(brought).is_file():
        config.fail("teacher-checkpoint", f"{brought}: no such file; give the path of a teacher checkpoint")
    if cfg["TEACHER_MIRROR"] and not distill.METHODS[cfg["METHOD"]].uses_logits:
        config.fail("teacher-mirror", f"{cfg['METHOD']} learns from the teacher's features, which the mirror does "
                    f"not average (it averages logits); leave it off, or choose kd, dkd or lskd")  # fmt: skip
    if cfg["STUDENT_INIT"] == "teacher" and (problem := models.selection_problem(cfg["STUDENT"], cfg["TEACHER"])):
        config.fail("student-init", f"{cfg['STUDENT']} cannot start from {cfg['TEACHER']}'s weights ({problem}); "
                    f"it takes a narrower or shallower student of the teacher's family (airnet_xs of airnet_m, "
                    f"resnet8x4 of resnet32x4, wrn_16_2 of wrn_40_2), or pass --student-init random")  # fmt: skip


def why_trained(cfg, out_dir, requested, stale):
    """Why each stage of `requested` trains: {stage: [reasons]}."""
    reasons = {stage: ["in --stages"] for stage in requested}
    for stage in requested:
        path = out_dir / f"{stage}.pt"
        if stage not in config.stage_list(cfg["STAGES"]):
            reasons[stage] = [] if stage in stale else ["distilled needs a teacher and none is saved: training the "
                                                        "teacher first"]  # fmt: skip
        if stage in stale:  # with --fresh (a teacher the distilled stage needs); refuse_stale stops it otherwise
            reasons[stage].append(f"{path} was made with other settings; retraining it (--fresh)")
        elif cfg["FRESH"] and path.exists():
            reasons[stage].append(f"{path} exists; retraining it (--fresh)")
    return reasons


def heading(cfg, dataset, device):
    """The settings of the whole run, as resolved, for the first line of the plan."""
    return (
        f"plan: {cfg['DATASET']} from {dataset.source}, {len(dataset.classes)} classes; on {device} with "
        f"{runtime.counted(torch.get_num_threads(), 'thread')}; seed {cfg['SEED']}"
    )


def settings(cfg, stage):
    """The settings that shape `stage`, as this run resolved them (a recipe, a dataset's defaults, typed flags)."""
    index = STAGES.index(stage)
    epochs = cfg["EPOCHS"][index]
    text = f"{cfg['TEACHER'] if stage == 'teacher' else cfg['STUDENT']}, {epochs} epoch{'s' * (epochs != 1)}, "
    text += f"lr {cfg['LR'][index]:g}"
    if stage == "distilled":
        text += f", method {cfg['METHOD']}, temperature {cfg['TEMPERATURE']:g}, alpha {cfg['ALPHA']:g}"
        problem = models.selection_problem(cfg["STUDENT"], cfg["TEACHER"])  # cached (starts_from_teacher asks too)
        chosen = [("student from the teacher", distill.starts_from_teacher(cfg)),
                  (f"student from random weights (auto: {problem})", cfg["STUDENT_INIT"] == "auto" and problem),
                  ("route", cfg["ROUTE"]), ("mirrored teacher", cfg["TEACHER_MIRROR"])]  # fmt: skip
        text += "".join(f", {words}" for words, on in chosen if on)
    return text


def saved_stages(cfg, dataset, out_dir, requested):
    """The finished stages this run may reuse ({stage: checkpoint}) and those
    saved with other settings ({stage: what differs}). Stages that --fresh
    retrains are not read."""
    brought = cfg["TEACHER_CHECKPOINT"]
    finished, stale = {}, {}
    for stage in STAGES:
        if cfg["FRESH"] and stage in requested or brought and stage == "teacher":
            continue
        teacher_file = brought or out_dir / "teacher.pt"
        digest = checkpoint.file_digest(teacher_file) if brought or "teacher" in finished else None
        saved, changed = load_finished(out_dir, stage, cfg, dataset, digest)
        if saved is not None:
            (stale if changed else finished)[stage] = changed or saved
    return finished, stale


def refuse_stale(cfg, out_dir, requested, stale):
    """Stop the run when it needs a stage saved with other settings and --fresh does not retrain it."""
    for stage in STAGES:
        if stage in stale and stage in requested and not cfg["FRESH"]:
            raise TrainingError(f"{out_dir / f'{stage}.pt'} was made with other settings ({'; '.join(stale[stage])}); "
                                f"pass --fresh to retrain it, or choose another --out-dir", exit_code=2)  # fmt: skip


def trained_row(decided, stage, cfg, device, out_dir, teacher_digest, reasons):
    """The row of a stage this run trains: resumed from its .last.pt,
    retrained over its checkpoint (--fresh) or trained from the start;
    `reasons` says why it trains."""
    last, path = out_dir / f"{stage}.last.pt", out_dir / f"{stage}.pt"
    state = load_unfinished(decided, last, stage, cfg, device, teacher_digest)
    if state is not None:
        epoch, step = state["progress"]["epoch"], state["progress"]["step"]
        reason = "; ".join([*reasons, f"resuming {last} at epoch {epoch}, step {step}"])
        return Row(stage, "resume", reason, settings(cfg, stage), progress=state)
    if cfg["RESUME"]:
        reasons = [*reasons, f"nothing to resume for {stage} (no {last}); training it from the start"]
    action = "retrain" if cfg["FRESH"] and path.exists() else "train"
    return Row(stage, action, "; ".join(reasons), settings(cfg, stage))


def kept_row(stage, cfg, out_dir, requested, saved, changed):
    """The row of a stage this run does not train: kept, or skipped (left out of the results)."""
    path = out_dir / f"{stage}.pt"
    if changed:
        return Row(stage, "skip", f"{path} was made with other settings; left out of the results", changed=changed)
    if saved is None:
        return Row(stage, "skip", "not in --stages, and none is saved")
    if requested:
        reason = f"{path} exists (test accuracy {saved['metrics']['test_acc']:.2%}); skipping it (--fresh retrains)"
    else:
        reason = f"{path} exists (test accuracy {saved['metrics']['test_acc']:.2%}); not in --stages, reported"
    return Row(stage, "keep", reason, settings(cfg, stage), saved=saved)


def load_finished(out_dir, stage, cfg, dataset, teacher_digest=None):
    """The checkpoint of a finished stage (None when there is none), and what
    differs between the settings that made it and this run's (a stage may be
    reused only when nothing does). For the distilled stage, the teacher is
    part of its settings: `teacher_digest` is that of the teacher file it
    would be distilled from now (None: the teacher is retrained)."""
    path = out_dir / f"{stage}.pt"
    if not path.exists():
        return None, []
    try:
        saved = checkpoint.load(path)
    except checkpoint.OtherFormat as error:
        raise TrainingError(f"{path}: {error.problem}; pass --fresh to retrain it", exit_code=2) from None
    except ValueError as error:
        fix = "" if isinstance(error, checkpoint.Unreadable) else "; delete it or pass --fresh to retrain"
        raise TrainingError(f"{path}: {error}{fix}") from None
    if "metrics" not in saved:
        raise TrainingError(f"{path} is not a finished stage of train.py (no metrics); pass --fresh to retrain it")
    changed = config.differences(saved["config"], cfg, stage)
    if saved["classes"] != dataset.classes:
        changed.append("the dataset's classes")
    by_setting = "IMAGE_SIZE" in config.shaping(cfg, stage)  # a folder dataset: the setting names the change
    if not by_setting and saved.get("image_size", dataset.image_size) != dataset.image_size:  # a loader of one's own
        changed.append(f"the images' size ({saved['image_size']} then, {dataset.image_size} now)")
    if stage == "distilled" and saved["teacher_digest"] != teacher_digest:
        changed.append("the teacher (another teacher.pt)")
    return saved, changed


def load_unfinished(decided, path, stage, cfg, device, teacher_digest=None):
    """The saved progress of an unfinished stage (its .last.pt), or None.

    It is used only with --resume (also with --fresh: a retrain stopped
    part-way), and must come from the same settings (and the same teacher,
    see load_finished); with --fresh alone it is ignored and later
    overwritten; otherwise it stops the run, so that no progress is lost by
    accident."""
    if not path.exists() or cfg["FRESH"] and not cfg["RESUME"]:
        return None
    if not cfg["RESUME"]:
        raise TrainingError(f"{path} holds an unfinished {stage} run; continue it with: {decided.resume_command()}  "
                            f"(or pass --fresh to start the stage over)", exit_code=2)  # fmt: skip
    over = "leave out --resume to start it over" if cfg["FRESH"] else "pass --fresh"
    try:
        state = checkpoint.load_progress(path)
    except checkpoint.OtherFormat as error:
        raise TrainingError(f"{path}: {error.problem}; {over}", exit_code=2) from None
    except ValueError as error:
        fix = "" if isinstance(error, checkpoint.Unreadable) else f"; delete it or {over}"
        raise TrainingError(f"{path}: {error}{fix}", exit_code=2) from None
    changed = config.differences(state["config"], cfg, stage)
    if stage == "distilled" and state["teacher"] != teacher_digest:
        changed.append("the teacher (another teacher.pt)")
    if changed:
        raise TrainingError(f"{path} was started with other settings ({'; '.join(changed)}); resume with those, "
                            f"or {over}", exit_code=2)  # fmt: skip
    if state["device"] != device.type:  # the data generator's state belongs to its device
        raise TrainingError(f"{path} was started on {state['device']}; resume it with --device {state['device']}, "
                            f"or {over}", exit_code=2)  # fmt: skip
    return state


def saved_teacher(out_dir, saved):
    """The network of the teacher saved in out_dir and the digest of its file,
    and the weights it kept during its training."""
    path = out_dir / "teacher.pt"
    try:
        return (checkpoint.build_model(saved), checkpoint.file_digest(path)), route(saved)
    except ValueError as error:
        raise TrainingError(f"{path}: {error}; pass --fresh to retrain the teacher") from None


def brought_teacher(cfg, dataset):
    """The network of --teacher-checkpoint, its file's digest, what the file
    held and the weights it kept during its training (a teacher.pt of this
    repo), or a one-line refusal of a file that is not a teacher checkpoint or
    whose weights do not fit --teacher."""
    path = cfg["TEACHER_CHECKPOINT"]
    try:
        model, kind, content = pretrained.load_teacher(path, cfg["TEACHER"], dataset.classes, dataset.in_channels)
    except ValueError as error:
        raise TrainingError(f"argument --teacher-checkpoint: {path}: {error}", exit_code=2) from None
    return model, checkpoint.file_digest(path), kind, route(content)


def route(saved):
    """The weights a teacher checkpoint kept during its training, early to late (none in other files)."""
    anchors = saved.get("anchors", []) if isinstance(saved, dict) else []
    return [anchor["state"] for anchor in anchors]

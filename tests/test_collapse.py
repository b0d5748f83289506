"""The warning for a validation accuracy that collapses while training accuracy is high."""

import pytest

import stages


def test_a_collapse_under_bf16_is_named_with_its_likely_cause_and_what_to_try():
    # the teacher of a digit dataset under bf16: 94.5% of its training images right, 11.5% of validation
    line = stages.collapse_warning("teacher", 2, 0.945, 0.115, 10, amp_on=True)
    assert line == (
        "warning: teacher epoch 2: validation accuracy 11.50% is near chance (10%) while training accuracy is "
        "94.50%; the likely cause is bf16 mixed precision: start the stage over with --fresh --amp off, or try "
        "--threads 1"
    )


def test_a_collapse_in_float32_points_at_the_batch_norm_statistics():
    line = stages.collapse_warning("student", 3, 0.9, 0.01, 100, amp_on=False)
    assert line.startswith("warning: student epoch 3: validation accuracy 1.00% is near chance (1%)")
    assert "batch-norm statistics" in line and "--amp off" not in line


@pytest.mark.parametrize(
    "train_acc,val_acc,classes",
    [
        (0.95, 0.92, 10),  # healthy
        (0.30, 0.12, 10),  # early training: nothing learnt yet, on either split
        (0.95, None, 10),  # no validation split
        (0.95, 0.20, 10),  # poor, but twice chance: not a collapse
        (0.70, 0.54, 2),  # two classes: 54% is near chance, but 70% training accuracy is not high
    ],
)
def test_no_warning_without_a_collapse(train_acc, val_acc, classes):
    assert stages.collapse_warning("teacher", 1, train_acc, val_acc, classes, amp_on=True) is None

"""``megdet plan --from``: the noise-scale model against its closed form, the projection of a
run whose logs are built to have a known noise scale and step time, and the one-line errors."""

import json
import math

import pytest

from megdet.errors import MegdetError
from megdet.projection import (
    StepTime,
    Window,
    calibrate,
    fit_step_time,
    measure_step_time,
    measure_threads,
    noise_from_gain,
    project,
    projection_dict,
    step_ratio,
    steps_at,
    stops_helping,
    summarize_run,
)
from megdet.solver.adascale import adascale_gain


@pytest.mark.parametrize("noise", [0.0, 3.0, 40.0, 900.0])
@pytest.mark.parametrize("batch", [16, 64, 1024])
def test_steps_and_examples_follow_mccandlish_closed_form(noise, batch):
    """S(B) = S_min (1 + B_noise / B) and E(B) = B S(B) = E_min (1 + B / B_noise), with S_min
    and E_min = S_min B_noise from a run of 1,000 steps at batch 32."""
    s_min = 1000 / (1 + noise / 32)
    windows = [Window(1, 0, 600, noise), Window(2, 600, 1000, noise)]
    steps = steps_at(windows, batch, run_batch=32)
    assert steps == pytest.approx(s_min * (1 + noise / batch), rel=1e-12)
    if noise:
        assert batch * steps == pytest.approx(s_min * noise * (1 + batch / noise), rel=1e-12)
    assert steps_at(windows, 32, run_batch=32) == pytest.approx(1000, rel=1e-12)


def test_all_noise_is_perfect_scaling_and_no_noise_is_none():
    assert step_ratio(math.inf, 256, 16) == 16 / 256
    assert step_ratio(0.0, 256, 16) == 1.0


def test_windows_count_their_own_noise_and_a_cut_counts_in_part():
    windows = [Window(1, 0, 100, 10.0), Window(2, 100, 300, 1000.0)]
    expected = 100 * (1 + 10 / 64) / (1 + 10 / 16) + 50 * (1 + 1000 / 64) / (1 + 1000 / 16)
    assert steps_at(windows, 64, 16, until=150) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("noise", [0.5, 17.0, 250.0, 4000.0])
def test_noise_from_gain_inverts_adascale_gain(noise):
    gain = adascale_gain(grad_sq=2.0, grad_var=2.0 * noise, base_batch=16, batch=256)
    assert noise_from_gain(gain, 16, 256) == pytest.approx(noise, rel=1e-9)
    assert noise_from_gain(1.0, 16, 256) == 0.0 and noise_from_gain(16.0, 16, 256) == math.inf


NOISE = {1: 20.0, 2: 80.0, 3: None, 4: 160.0}  # epoch 3: |G|^2 <= 0, all noise


def _run_folder(path, noise=NOISE, per_epoch=50, batch=32, evals=(10.0, 25.0, 35.0, 40.0),
                adascale=False, gns=True, hardware=None):  # fmt: skip
    """A run of 4 epochs of 50 steps at batch 32 on 2 processes, logged every 10 steps, with
    the given noise scale per epoch, 0.5 s a step, and mmAP ``evals`` after each epoch."""
    path.mkdir()
    plan = {"global_batch": batch, "base_batch": 16, "world_size": 2,
            "images_per_device": batch // 2, "num_train_images": 1600,
            "lr_scaling": "adascale" if adascale else "linear"}  # fmt: skip
    if hardware:
        plan["hardware"] = hardware
    (path / "plan.json").write_text(json.dumps(plan))
    lines = []
    for epoch, value in noise.items():
        for it in range((epoch - 1) * per_epoch + 10, epoch * per_epoch + 1, 10):
            record = {"iter": it, "epoch": it / per_epoch, "lr": 0.1, "loss": 1.0,
                      "time_per_iter": 0.5}  # fmt: skip
            if gns:  # |G|^2 varies inside the epoch; the ratio of the means is the value
                signal = 1.0 + (it % 20) / 10
                record.update(grad_sq=-signal if value is None else signal,
                              grad_var=signal * (value or 50.0))  # fmt: skip
            if adascale:
                # |G|^2 <= 0 is all noise: the largest gain, batch / 16
                record["gain"] = adascale_gain(-1.0 if value is None else 1.0, value or 1.0, 16,
                                               batch)  # fmt: skip
            lines.append(json.dumps(record))
        lines.append(json.dumps({"iter": epoch * per_epoch, "epoch": float(epoch),
                                 "eval": {"mmAP": evals[epoch - 1] / 100}}))  # fmt: skip
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_a_constructed_run_projects_to_its_known_steps_and_times(tmp_path):
    run = summarize_run(_run_folder(tmp_path / "run"))
    assert [w.noise_scale for w in run.windows] == pytest.approx([20.0, 80.0, 160.0, 160.0])
    assert run.unmeasured == [3] and run.steps == 200 and run.logged_step_s == 0.5
    assert run.final == pytest.approx(40.0) and run.reached(30.0) == 150
    # 0.2 s + 0.01 s per image; 8 MB of gradient at 1 GB/s: 2 (k - 1) / k x 8 ms.
    step_time = StepTime(0.2, 0.01, 8_000_000, 1e9, {8: 0.28, 16: 0.36})
    rows = project(run, step_time, devices=[2, 8], per_device=[4, 16], until=150, pace="model")
    by = {(r.devices, r.per_device): r for r in rows}
    for (k, n), row in by.items():
        batch = k * n
        steps = sum(50 * (1 + b / batch) / (1 + b / 32) for b in (20.0, 80.0, 160.0))
        assert row.batch == batch and row.steps == pytest.approx(steps, rel=1e-12)
        seconds = 0.2 + 0.01 * n + 2 * (k - 1) / k * 8e-3
        assert row.step_s == pytest.approx(seconds, rel=1e-12)
        assert row.hours == pytest.approx(steps * seconds / 3600, rel=1e-12)
    best2 = min((by[2, 4], by[2, 16]), key=lambda r: r.hours)
    assert best2.best and sum(r.best for r in rows) == 2
    best8 = next(r for r in rows if r.devices == 8 and r.best)
    assert best8.efficiency == pytest.approx(best2.hours * 2 / (best8.hours * 8), rel=1e-12)
    document = projection_dict(run, step_time, rows, 30.0, "model")
    assert json.loads(json.dumps(document))["rows"][0]["devices"] == 2


def test_an_adascale_run_reads_its_noise_from_its_gain(tmp_path):
    run = summarize_run(_run_folder(tmp_path / "run", batch=256, adascale=True))
    # The gain in epoch 3 is the all-noise one (16): infinite, filled as unmeasured.
    assert [w.noise_scale for w in run.windows] == pytest.approx([20.0, 80.0, 160.0, 160.0])
    assert run.adascale and run.unmeasured == [3]


def test_where_more_devices_stop_helping():
    step_time = StepTime(1.0, 0.0, 0, 1.0, {})
    run = type("Run", (), {"windows": [Window(1, 0, 1000, 100.0)], "global_batch": 64})
    rows = project(run, step_time, devices=[256, 512, 1024], per_device=[1])
    # Steps at B = k: 1000 (1 + 100 / B) / (1 + 100 / 64); 256 -> 512 devices: 0.86x the
    # time, 512 -> 1024: 0.92x, less than 10% off.
    assert stops_helping(rows) == 1024
    assert stops_helping(rows[:2]) is None


def test_fit_step_time_is_the_line_through_two_points():
    fitted = fit_step_time({4: 0.30, 8: 0.50}, 100, 1e9)
    assert fitted.fixed_s == pytest.approx(0.10) and fitted.per_image_s == pytest.approx(0.05)
    assert fit_step_time({4: 0.5, 8: 0.49}, 100, 1e9).per_image_s == 0.0  # timing noise


def test_calibration_adds_what_the_run_paid_beyond_the_measured_parts(tmp_path):
    """The run logged 0.5 s a step at 16 images x 2 processes; the measured parts say 0.2 +
    16 x 0.01 + 8 ms of all-reduce = 0.368 s: 0.132 s a step is added to every row."""
    run = summarize_run(_run_folder(tmp_path / "run", hardware={"device": "cpu", "threads": 1}))
    measured = StepTime(0.2, 0.01, 8_000_000, 1e9, {8: 0.28, 16: 0.36})
    calibrated, line = calibrate(measured, run, "cpu")
    assert calibrated.overhead_s == pytest.approx(0.5 - 0.368, rel=1e-12)
    assert calibrated.seconds(16, 2) == pytest.approx(0.5, rel=1e-12)  # the run's own point
    rows = project(run, calibrated, devices=[1, 8], per_device=[4], until=150)
    for row in rows:
        expected = measured.seconds(4, row.devices) + calibrated.overhead_s
        assert row.step_s == pytest.approx(expected, rel=1e-12)
    assert line.startswith("calibrated: the run logged 0.5 s per step at 16 images x 2")
    # Calibrating twice changes nothing: the overhead is the run's minus the measured parts.
    assert calibrate(calibrated, run, "cpu")[0].overhead_s == pytest.approx(calibrated.overhead_s)


def test_no_calibration_across_kinds_of_device(tmp_path):
    run = summarize_run(_run_folder(tmp_path / "run", hardware={"device": "cuda", "threads": 8}))
    measured = StepTime(0.2, 0.01, 8_000_000, 1e9, {})
    kept, line = calibrate(measured, run, "cpu")
    assert kept == measured and line == (
        "not calibrated: the run computed on cuda, the step was measured on cpu"
    )
    assert calibrate(measured, run, "cuda")[0].overhead_s != 0.0


def test_a_step_is_measured_with_the_threads_of_one_of_the_runs_processes(tmp_path, monkeypatch):
    import os

    import torch

    from megdet import projection

    recorded = summarize_run(_run_folder(tmp_path / "a", hardware={"device": "cpu", "threads": 3}))
    assert measure_threads(recorded, "cpu") == 3 and measure_threads(recorded, "cuda") is None
    older = summarize_run(_run_folder(tmp_path / "b"))  # no hardware: megdet train's split
    assert measure_threads(older, "cpu") == max(1, os.cpu_count() // 2)
    seen = []
    monkeypatch.setattr(projection, "_time_steps", lambda *a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    measure_step_time(None, None, (1, 2), torch.device("cpu"), threads=1)
    assert seen == [1] and torch.get_num_threads() == before


def test_device_counts_that_divide_no_batch_are_a_one_line_error(tmp_path):
    run = summarize_run(_run_folder(tmp_path / "run"))
    step_time = StepTime(1.0, 0.0, 0, 1.0, {})
    with pytest.raises(MegdetError, match=r"^--devices 48: divides none of --batches 256,512"):
        project(run, step_time, devices=[8, 48], batches=[256, 512])


def test_bad_runs_are_one_line_errors(tmp_path, cli):
    from tests.conftest import one_line_error

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    one_line_error(cli("plan", "--from", not_a_run), f"--from {not_a_run}: not a megdet run")
    quiet = _run_folder(tmp_path / "quiet", gns=False)
    one_line_error(cli("plan", "--from", quiet), f"--from {quiet}: the run logged no gradient")
    run = _run_folder(tmp_path / "run")
    one_line_error(cli("plan", "--from", run, "--target", "50"), "--target: ")
    one_line_error(cli("plan", "--from", run, "--devices", "8,x"), "--devices: expected")
    one_line_error(cli("plan", "--from", run, "--config", "default"), "plan --from: the run's")
    one_line_error(cli("plan"), "plan: give --config")
    assert not (run / "projection.json").exists()


def test_the_module_that_needs_the_most_steps_sets_the_pace():
    """Above the run's batch the module with the smallest noise scale needs the most steps,
    below it the one with the largest; the whole model's noise scale lies between."""
    window = Window(1, 0, 100, 300.0, {"backbone": 3000.0, "rpn": 10.0})
    assert window.ratio(256, 16, "module") == pytest.approx(step_ratio(10.0, 256, 16))
    assert window.ratio(8, 16, "module") == pytest.approx(step_ratio(3000.0, 8, 16))
    assert window.ratio(256, 16, "model") == pytest.approx(step_ratio(300.0, 256, 16))
    assert Window(1, 0, 100, 300.0).ratio(256, 16, "module") == step_ratio(300.0, 256, 16)


def test_module_noise_scales_are_read_per_group(tmp_path):
    folder = _run_folder(tmp_path / "run")
    lines = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "grad_sq" in record:  # the rpn: a quarter of the model's noise scale
            record.update(grad_sq_rpn=record["grad_sq"], grad_var_rpn=record["grad_var"] / 4)
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = summarize_run(folder)
    assert [w.modules["rpn"] for w in run.windows] == pytest.approx([5.0, 20.0, 40.0, 40.0])
    rows = project(run, StepTime(1.0, 0.0, 0, 1.0, {}), [2], [64], pace="module")
    expected = sum(50 * step_ratio(n, 128, 32) for n in (5.0, 20.0, 40.0, 40.0))
    assert rows[0].steps == pytest.approx(expected, rel=1e-12)

"""core.run.eta: the ETA does not swing early in a job (issue 13, item 11), on a synthetic timeline."""

from __future__ import annotations

from core.run.eta import EtaEstimator


def timeline() -> list[tuple[float, float, str, int | None]]:
    """(t, fraction, stage, block) of a 30 s job: slow loading and calibration (10% of the fraction,
    15 s), 30 pruning blocks of 0.4 s (80%), evaluation and export (10%, 3 s)."""
    points: list[tuple[float, float, str, int | None]] = []
    for i in range(11):
        points.append((i * 1.0, 0.005 * i, "loading", None))  # 10 s for 5%
    for i in range(1, 6):
        points.append((10 + i * 1.0, 0.05 + 0.01 * i, "calibrating", None))  # 5 s for 5%
    for b in range(1, 31):
        points.append((15 + b * 0.4, 0.10 + 0.8 * b / 30, "pruning", b))
    for i in range(1, 4):
        points.append((27 + i * 1.0, 0.90 + 0.1 * i / 3, "evaluating", None))
    return points


def test_no_estimate_before_the_floor_then_close_to_the_truth() -> None:
    est = EtaEstimator()
    total = 30.0
    shown = []
    for t, f, stage, block in timeline():
        eta = est.update(t, f, stage, block)
        if stage in ("loading", "calibrating") or (stage == "pruning" and block == 1):
            assert eta is None, (t, stage, block, eta)  # nothing shown from the slow start
        if eta is not None:
            shown.append((t, eta, total - t))
    assert shown and shown[-1][1] == 0.0
    for t, eta, truth in shown:
        assert eta <= max(2.5 * truth, truth + 10), (t, eta, truth)  # never minutes for seconds
    naive = [t * (1 - f) / f for t, f, stage, _ in timeline() if f >= 0.01 and stage == "loading"]
    assert max(naive) > 4 * total  # what the naive formula showed (the 2m21s for a 30 s job)


def test_estimates_do_not_jump() -> None:
    est = EtaEstimator()
    prev = None
    for t, f, stage, block in timeline():
        eta = est.update(t, f, stage, block)
        if eta is not None and prev is not None and prev[1] > 0:
            dt = t - prev[0]
            assert eta <= prev[1] - dt + max(5.0, 0.5 * prev[1]), (t, prev, eta)  # no upward swing
        if eta is not None:
            prev = (t, eta)


def test_done_is_zero_and_fraction_is_clamped() -> None:
    est = EtaEstimator(min_blocks=0)
    assert est.update(0.0, 0.0) is None
    assert est.update(5.0, 0.5) == 5.0
    assert est.update(6.0, 1.5) == 0.0


def _pipeline_timeline(
    durations: dict[str, float], nblocks: int = 30
) -> list[tuple[float, float, str, int | None]]:
    """(t, fraction, stage, block) as `core.run.pipeline` reports them (its own stage weights), for a job
    whose stages take `durations` seconds; dense and pruned evaluation report 10 windows each."""
    from core.run.pipeline import STAGE_WEIGHTS, _Stages

    got: list[tuple[float, float, str, int | None]] = []
    clock = [0.0]
    stages = _Stages(
        [(k, STAGE_WEIGHTS[k]) for k in durations],
        lambda p: got.append((clock[0], p.fraction, p.stage, p.block)),
    )
    steps = {"pruning": nblocks, "dense_eval": 10, "pruned_eval": 10}
    for key, seconds in durations.items():
        stage = "evaluating" if key.endswith("_eval") else key
        stages.emit(key, 0.0, stage)
        n = steps.get(key, 1)
        for i in range(1, n + 1):
            clock[0] += seconds / n
            block = i if key == "pruning" else None
            stages.emit(key, i / n, stage, block=block, nblocks=nblocks if block else None)
    return got


def test_the_pipeline_schedule_of_a_30_s_job_never_shows_minutes() -> None:
    """The issue's case on the pipeline's real fraction schedule: slow load and a dense baseline
    before any block is pruned, then 30 fast blocks (30 s in all)."""
    durations = {"loading": 9.0, "calibrating": 2.0, "dense_eval": 6.0, "pruning": 8.0}
    durations |= {"pruned_eval": 4.0, "exporting": 1.0}
    total = sum(durations.values())
    points = _pipeline_timeline(durations)
    naive = max(t * (1 - f) / f for t, f, _, _ in points if f >= 0.01 and t > 0)
    assert naive > 2 * total  # the old formula: minutes for a 30 s job
    est = EtaEstimator()
    shown = [(t, est.update(t, f, stage, block)) for t, f, stage, block in points]
    assert all(eta is None for t, eta in shown if t < 9.0 + 2.0 + 6.0)  # nothing before pruning
    late = [(t, eta) for t, eta in shown if eta is not None]
    assert late and late[-1][1] == 0.0
    for t, eta in late:
        assert eta <= max(2.0 * (total - t), 5.0), (t, eta, total - t)

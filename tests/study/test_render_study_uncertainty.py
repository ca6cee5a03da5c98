"""The uncertainty figures draw from a real analysis (error bars, censored arrows, brackets, goal sweep)."""
import numpy as np

from fastsgd.study.render import b_crit_against_goal, steps_with_intervals
from fastsgd.study.steps.analysis import BUDGET, GOAL, TrialRecord, analyze, steps_against_goal


def _records():
    recs = []
    for b in (8, 32, 128, 512, 2048):
        s = int(50 + 12800 / b)
        for t, f in enumerate((1.0, 1.1, 1.25)):
            recs.append(TrialRecord(b, t, t, {"lr": 0.1 * (t + 1)}, GOAL, [0, int(s * f)], {"val_error": [0.9, 0.1]}))
        recs += [TrialRecord(b, 10 + j, 10 + j, {"lr": 0.1}, GOAL, [0, int(s * f)], {"val_error": [0.9, 0.1]},
                             role="reseed", base_trial=0) for j, f in enumerate((1.05, 0.97))]
    recs += [TrialRecord(4, t, t, {"lr": 0.1}, BUDGET, [0, 900], {"val_error": [0.9, 0.5]}) for t in range(2)]
    return recs


def test_steps_with_intervals_draws_every_layer(tmp_path):
    summary = analyze(_records(), goal=0.2, metric="val_error", n_boot=100)
    assert summary["per_batch_size"][0]["status"] == "censored"
    fig = steps_with_intervals(summary, title="toy")
    ax, axr = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("within-point CI" in x for x in labels) and any("censored" in x for x in labels)
    assert any(x.startswith("fit: B_crit") for x in labels) and any("bracket" in x for x in labels)
    assert len(axr.lines) == 2                                  # zero line and residuals
    np.testing.assert_allclose(axr.lines[1].get_xdata(), [8, 32, 128, 512, 2048])
    fig.savefig(tmp_path / "steps.png")
    assert (tmp_path / "steps.png").stat().st_size > 1000


def test_b_crit_against_goal_marks_refused_fits(tmp_path):
    sweep = steps_against_goal(_records(), [0.5, 0.2], metric="val_error", n_boot=50)
    sweep.append({"goal": 0.05, "B_crit": None, "B_crit_ci": None, "fit_refused": "no S(B) fit: ..."})
    fig = b_crit_against_goal(sweep, metric="val_error")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "fit B_crit (CI)" in labels and any("fit refused" in x for x in labels)
    assert ax.get_xlim()[0] > ax.get_xlim()[1]                  # lower error = harder goal, drawn to the right
    fig.savefig(tmp_path / "goal.png")

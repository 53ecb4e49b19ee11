"""Trial figures: budget metrics with their 90% confidence bounds, and budgets judged on them."""
import numpy as np
import pytest

from skimformer.tuning import Budget
from skimformer.tuning.figures import decoder_figures, encoder_figures, paired_ratio
from skimformer.tuning.search import describe


def _logits(classes: np.ndarray, n: int = 10) -> np.ndarray:
    out = np.zeros((len(classes), n), dtype=np.float32)
    out[np.arange(len(classes)), classes] = 5.0
    return out


def test_a_drop_offset_by_fixes_is_judged_on_its_bound():
    """200 labelled images: the candidate breaks 4 and fixes 5; it gains half a point, but its
    drop's bound is over one point, as on rows the search never saw it may well be."""
    labels = np.arange(200) % 10
    reference = labels.copy()
    reference[:5] = (labels[:5] + 1) % 10  # the reference misses 5 images
    candidate = labels.copy()
    candidate[5:9] = (labels[5:9] + 1) % 10  # the candidate fixes those and misses 4 others
    figures = encoder_figures(_logits(reference), _logits(candidate), "logits", None, labels)
    assert figures["top1-drop"] == pytest.approx(-0.5)
    assert figures["top1-drop_bound"] == pytest.approx(-0.5 + 1.2816 * np.std(
        100.0 * ((reference == labels).astype(float) - (candidate == labels)), ddof=1) / np.sqrt(200))
    budget = Budget("top1-drop", 1.0)
    assert budget.violation(figures) > 0
    assert "top1-drop -0.5 (90% bound 1." in describe([budget], figures)


def test_a_candidate_that_changes_no_prediction_is_exact():
    labels = np.arange(50) % 10
    figures = encoder_figures(_logits(labels), _logits(labels), "logits", None, labels)
    assert figures["top1-drop"] == figures["top1-drop_bound"] == 0.0
    assert figures["agreement"] == figures["agreement_bound"] == 1.0
    assert Budget("top1-drop", 1.0).violation(figures) <= 0 and Budget("agreement", 0.99).violation(figures) <= 0


def test_cosine_bound_lies_below_its_mean_by_the_rows_spread():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(64, 32))
    candidate = reference + 0.1 * rng.normal(size=(64, 32))
    figures = encoder_figures(reference, candidate, "pooled", None, None)
    assert figures["cosine_bound"] < figures["cosine"] < 1.0
    assert figures["cosine"] - figures["cosine_bound"] < 0.01


def test_decoder_figures_bound_each_metric_per_position():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(2, 20, 50)).astype(np.float32)
    candidate = reference + 0.5 * rng.normal(size=reference.shape).astype(np.float32)
    targets = reference.argmax(-1)
    figures = decoder_figures(reference, candidate, targets)
    assert figures["agreement_bound"] < figures["agreement"] < 1.0
    assert figures["ppl-ratio_bound"] > figures["ppl-ratio"] > 1.0
    assert Budget("ppl-ratio", figures["ppl-ratio"]).violation(figures) > 0  # judged on the bound


def test_figures_of_earlier_runs_without_bounds_are_judged_on_their_values():
    assert Budget("cosine", 0.99).violation({"cosine": 0.995}) == pytest.approx(-0.005)


def test_speed_is_the_paired_rounds_ratio_with_a_bound_below_it():
    """Each round times both engines back to back: a machine that slows down for a while slows
    both, and the rounds' ratios stay steady; a gain as large as the rounds' spread is not one."""
    drift = np.array([1.0, 1.0, 1.6, 1.6, 1.0, 1.3, 1.0, 1.0])
    steady = paired_ratio(list(30 * drift), list(24 * drift))
    assert steady["ratio"] == pytest.approx(1.25) and steady["ratio_bound"] == pytest.approx(1.25)
    noisy = paired_ratio([30, 25, 31, 24, 30, 26], [24, 30, 25, 29, 24, 28])
    assert noisy["ratio"] > 1.0 and noisy["ratio_bound"] < 1.0

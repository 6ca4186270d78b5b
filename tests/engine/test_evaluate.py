"""Evaluation metrics and the fully-convolutional multi-view scoring, against hand-computed values; the
evaluation loader's memory pinning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from nlnet.engine.build import build_model
from nlnet.engine.builtin import resolve_builtin
from nlnet.engine.distributed import DistContext
from nlnet.engine.evaluate import build_eval_loader, mean_average_precision, top_k_accuracy, video_scores

CPU = DistContext(0, 1, 0, torch.device("cpu"), True, "none")


def _cfg(video_set, tiny_recipe, out, **overrides):
    return resolve_builtin(OmegaConf.create(tiny_recipe(video_set, out, **overrides)))


def test_top_k_accuracy_by_hand():
    scores = np.array(
        [
            [0.1, 0.5, 0.2, 0.0, 0.0, 0.2],  # label 1 ranks 1st
            [0.3, 0.2, 0.1, 0.15, 0.05, 0.2],  # label 2 ranks 5th
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0 ranks 6th
            [0.2, 0.3, 0.1, 0.1, 0.1, 0.2],  # label 5 ranks 3rd (after 0.3 and the tied 0.2 of class 0)
        ]
    )
    labels = np.array([1, 2, 0, 5])
    assert top_k_accuracy(scores, labels, ks=(1, 3, 5)) == {"top1": 0.25, "top3": 0.5, "top5": 0.75}


def test_mean_average_precision_by_hand_excludes_classes_without_positives():
    scores = np.array(
        [
            [0.9, 0.1, 0.3],
            [0.8, 0.4, 0.2],
            [0.7, 0.3, 0.1],
            [0.6, 0.2, 0.5],
            [0.5, 0.9, 0.4],
        ]
    )
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]])
    # Class 0: positives at ranks 1, 3, 5 -> precisions 1, 2/3, 3/5 -> AP 34/45.
    # Class 1: its one positive ranks 2nd behind a negative -> AP 1/2. Class 2: no positive, left out.
    value, per_class = mean_average_precision(scores, targets)
    assert per_class[0] == pytest.approx(34 / 45)
    assert per_class[1] == pytest.approx(0.5)
    assert np.isnan(per_class[2])
    assert value == pytest.approx((34 / 45 + 0.5) / 2)


def test_average_precision_counts_tied_scores_together():
    # A positive tied with a negative: the precision at that score is 1/2 whatever the order.
    value, _ = mean_average_precision(np.array([[0.5], [0.5], [0.1]]), np.array([[1], [0], [0]]))
    assert value == pytest.approx(0.5)


def test_metric_argument_errors():
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="0/1"):
        mean_average_precision(np.zeros((1, 2)), np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="scores"):
        top_k_accuracy(np.zeros((2, 3)), np.zeros(3, dtype=int))


class _LogitsAreTheInput(nn.Module):
    """forward_dense returns the input itself: (N, K=3, t, h, w) logits chosen by the test."""

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("multi_label", [False, True])
def test_video_scores_average_per_location_probabilities_over_space_time_and_views(multi_label):
    torch.manual_seed(0)
    clips = torch.randn(2, 4, 3, 2, 3, 2)  # 2 videos x 4 views, K=3 "classes", t=2, h=3, w=2 locations
    got = video_scores(_LogitsAreTheInput(), clips, multi_label=multi_label).numpy()
    logits = clips.double().numpy()
    expected = np.zeros((2, 3))
    for b in range(2):
        for v in range(4):
            total = np.zeros(3)
            for t in range(2):
                for y in range(3):
                    for x in range(2):
                        z = logits[b, v, :, t, y, x]
                        total += 1 / (1 + np.exp(-z)) if multi_label else np.exp(z) / np.exp(z).sum()
            expected[b] += total / 12 / 4
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    single = video_scores(_LogitsAreTheInput(), clips[:, 0], multi_label=multi_label)
    np.testing.assert_allclose(
        single.numpy(), video_scores(_LogitsAreTheInput(), clips[:, :1], multi_label=multi_label).numpy()
    )


def test_a_loader_built_for_cuda_pins_memory(tmp_path, video_set, tiny_recipe):
    cuda = dataclasses.replace(CPU, device=torch.device("cuda", 0))  # only the flag is looked at, no GPU needed
    loader = build_eval_loader(_cfg(video_set, tiny_recipe, tmp_path / "run"), "val", cuda)
    assert loader.pin_memory and not loader.persistent_workers
    assert not build_eval_loader(_cfg(video_set, tiny_recipe, tmp_path / "run"), "val", CPU).pin_memory


@pytest.mark.parametrize("multi_label", [False, True])
def test_views_in_chunks_score_like_all_views_at_once(tmp_path, video_set, tiny_recipe, multi_label):
    model = build_model(_cfg(video_set, tiny_recipe, tmp_path).model).eval()
    pixels = torch.randint(0, 256, (2, 6, 3, 4, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    floats = (pixels.double() - 114.75) / 57.375  # the recipe's normalisation, written out
    with torch.no_grad():
        expected = video_scores(model, floats.float(), multi_label=multi_label)
        for chunk in (1, 4, 6, 100):
            got = video_scores(model, pixels, multi_label=multi_label, view_chunk=chunk, mean=114.75, std=57.375)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="need the normalisation mean and std"):
        video_scores(model, pixels, multi_label=multi_label)
